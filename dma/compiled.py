"""The torch.compile route: `dma.attention` as two opaque custom ops with an autograd formula.

Under `torch.compile` the dispatcher, validation and plan run inside the ops at run time, so
a model that calls `dma.attention` traces with `fullgraph=True`. The ops share
`forward_impl`/`backward_impl` with the eager route; the one difference is that backward
rebuilds the selection plan instead of receiving it from forward (a plan is not a tensor the
op schema can carry), which costs one plan build per backward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .autograd import backward_impl, forward_impl, kernel_context, make_plan
from .dispatch import choose
from .validation import validate


def _problem(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, window, causal, scale,
             softcap):
    return validate(q, k, v, key_bias=key_bias, window=window, attn_bias=attn_bias,
                    attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal,
                    scale=scale, softcap=softcap)


@torch.library.custom_op("dma::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor],
                      attn_bias: Optional[Tensor], attn_mask: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], window: Optional[int], causal: bool,
                      scale: Optional[float], softcap: Optional[float],
                      backend: str) -> Tuple[Tensor, Tensor]:
    problem, inputs = _problem(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask,
                               window, causal, scale, softcap)
    o, lse, _ = forward_impl(problem, inputs, choose(problem, backend or None))
    return o.contiguous(), lse.contiguous()


@attention_forward.register_fake
def _(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, window, causal, scale,
      softcap, backend):
    _problem(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, window, causal, scale,
             softcap)  # bad input fails while tracing, with the eager route's messages
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("dma::attention_backward", mutates_args=())
def attention_backward(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       key_bias: Optional[Tensor], attn_bias: Optional[Tensor],
                       attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                       o: Tensor, lse: Tensor, window: Optional[int], causal: bool,
                       scale: Optional[float], softcap: Optional[float], backend: str,
                       needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    problem, inputs = _problem(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask,
                               window, causal, scale, softcap)
    problem = problem._replace(needs_grad=tuple(needs))
    chosen = choose(problem, backend or None)
    with kernel_context(problem.device):
        plan = make_plan(problem, inputs, chosen)
    grads = backward_impl(problem, inputs, chosen, plan, o, lse, do, dlse)
    return tuple(q.new_empty(0) if g is None else g.contiguous() for g in grads)


@attention_backward.register_fake
def _(do, dlse, q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, o, lse, window,
      causal, scale, softcap, backend, needs):
    likes = (q, k, v, key_bias, attn_bias)
    return tuple(t.new_empty(t.shape) if need else q.new_empty(0)
                 for t, need in zip(likes, needs))


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask = inputs[:7]
    ctx.options = inputs[7:]
    ctx.save_for_backward(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, *output)


def _backward(ctx, do, dlse):
    q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, o, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]] + [
        bool(n) and t is not None
        for n, t in zip(ctx.needs_input_grad[3:5], (key_bias, attn_bias))]
    grads = attention_backward(do, dlse, q, k, v, key_bias, attn_bias, attn_mask,
                               key_padding_mask, o, lse, *ctx.options, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None) + (None,) * len(ctx.options)


torch.library.register_autograd("dma::attention_forward", _backward,
                                setup_context=_setup_context)


def attention_traceable(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, window,
                        causal, scale, softcap, backend):
    return attention_forward(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask, window,
                             causal, scale, softcap, backend or "")

