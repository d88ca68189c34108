"""The one autograd path shared by every backend.

Forward builds the selection plan (once, saved for backward) and calls the backend's forward;
backward turns the incoming gradients into `delta` and calls the backend's backward. Empty
problems (B, Sq or Sk of 0) are answered here and never reach a backend.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .backends.base import Backend
from .selection import build_interval_plan
from .validation import SELECT_INTERVAL, Inputs, Problem


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs this device type's lower-precision ops in, or None
    where autocast is off (or the device type has none)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        pass
    return None


_NO_GUARD = contextlib.nullcontext()  # reusable: the common case costs no allocation


def kernel_context(device: torch.device):
    """What a call's kernels and torch ops run under, entered only where needed:
    * the inputs' CUDA device as the current one: Triton launches on the current device,
      and the plan's CUDA graphs follow its current stream (tensors on cuda:1 while cuda:0
      is current, as where a model's layers are spread over several GPUs);
    * autocast off: the inputs were cast at the entry (api.py, as SDPA takes them), and the
      plan's and the torch backend's own ops run in the dtypes they were written for."""
    guards = []
    if (device.type == "cuda" and device.index is not None
            and device.index != torch.cuda.current_device()):
        guards.append(torch.cuda.device(device))
    if autocast_dtype(device.type) is not None:
        guards.append(torch.autocast(device.type, enabled=False))
    if len(guards) <= 1:
        return guards[0] if guards else _NO_GUARD
    stack = contextlib.ExitStack()
    for guard in guards:
        stack.enter_context(guard)
    return stack


def make_plan(problem: Problem, inputs: Inputs, backend: Backend):
    if problem.selection != SELECT_INTERVAL or problem.is_empty:
        return None
    with torch.no_grad():
        return build_interval_plan(problem, inputs, backend.block_m,
                                   full_first=backend.full_first)


def _empty_forward(problem: Problem):
    o = torch.zeros(problem.batch, problem.seqlen_q, problem.heads, problem.head_dim,
                    dtype=problem.dtype, device=problem.device)
    lse = torch.full((problem.batch, problem.heads, problem.seqlen_q), float("-inf"),
                     dtype=torch.float32, device=problem.device)
    return o, lse


def forward_impl(problem: Problem, inputs: Inputs, backend: Backend):
    """(o, lse, plan): the forward every route shares."""
    if problem.is_empty:
        return (*_empty_forward(problem), None)
    with kernel_context(problem.device):
        plan = make_plan(problem, inputs, backend)
        o, lse = backend.forward(problem, inputs, plan)
    return o, lse, plan


def backward_impl(problem: Problem, inputs: Inputs, backend: Backend, plan, o, lse, do, dlse):
    """(dq, dk, dv, d key_bias, d attn_bias), None where no gradient is needed."""
    if do is None:
        do = torch.zeros_like(o)
    if problem.is_empty:
        return tuple(
            None if (t is None or not need) else torch.zeros_like(t)
            for t, need in zip(inputs[:3] + (inputs.key_bias, inputs.attn_bias),
                               problem.needs_grad)
        )
    # ds = p * (dp - delta) with delta = rowsum(do * o) - dlse covers the gradients of both
    # outputs (d lse_i / d s_ij = p_ij).
    with kernel_context(problem.device):
        delta = backend.row_delta(problem, o, do)
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse.to(delta.dtype), 0.0)
        return backend.backward(problem, inputs, plan, o, lse, do.contiguous(),
                                delta.contiguous())


class AttentionFunction(torch.autograd.Function):
    """The eager route: the plan built in forward is saved for backward."""

    @staticmethod
    def forward(ctx, problem, backend, attn_mask, key_padding_mask, q, k, v, key_bias,
                attn_bias):
        inputs = Inputs(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask)
        o, lse, plan = forward_impl(problem, inputs, backend)
        ctx.problem, ctx.backend, ctx.plan = problem, backend, plan
        # An output that the loss does not use (lse, nearly always) gets None, not a tensor
        # of zeros that backward_impl would fold into delta with three more launches.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, o, lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        saved = ctx.saved_tensors  # once: activation checkpointing unpacks each save once
        inputs = Inputs(*saved[:7])
        o, lse = saved[7:]
        with torch.no_grad():
            grads = backward_impl(ctx.problem, inputs, ctx.backend, ctx.plan, o, lse, do, dlse)
        if torch.is_grad_enabled():  # create_graph=True
            grads = no_second_derivative(grads)
        return (None, None, None, None) + tuple(grads)


SECOND_DERIVATIVE = "dma.attention has no second derivative (double backward)"


def no_second_derivative(grads):
    """Gradients, each made to raise if it is differentiated again: the kernels compute the
    first derivative only, and without this a gradient penalty (create_graph=True) would
    treat dma's gradients as constants and silently miss its terms. (What
    @once_differentiable does, also where the incoming gradient needs none.)"""
    delayed = getattr(torch._C._functions, "DelayedError", None)
    live = [g for g in grads if g is not None]
    if delayed is None or not live:
        return grads
    marked = delayed(SECOND_DERIVATIVE.encode(), len(live))(
        *(g.detach().requires_grad_() for g in live))
    marked = iter((marked,) if isinstance(marked, torch.Tensor) else marked)  # one: bare
    return tuple(None if g is None else next(marked) for g in grads)


def run(problem: Problem, inputs: Inputs, backend: Backend):
    """Forward through the shared autograd function; returns (o, lse). Calls that need no
    gradient (inference, `torch.no_grad()`) skip the autograd function and keep no plan."""
    if not (problem.any_grad and torch.is_grad_enabled()):
        o, lse, _ = forward_impl(problem, inputs, backend)
        return o, lse
    return AttentionFunction.apply(
        problem, backend, inputs.attn_mask, inputs.key_padding_mask,
        inputs.q, inputs.k, inputs.v, inputs.key_bias, inputs.attn_bias,
    )
