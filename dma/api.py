"""The public entry points: `attention` and `explain`."""

from __future__ import annotations

from typing import Optional

import torch

from . import autograd, dispatch
from .autograd import autocast_dtype
from .validation import validate


def attention(
    q,
    k,
    v,
    *,
    key_bias=None,
    window: Optional[int] = None,
    attn_bias=None,
    attn_mask=None,
    key_padding_mask=None,
    causal: bool = False,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Dynamic Mask Attention (docs/semantics.md is the full contract).

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); key_bias: (B or 1, Hb, Sk) with Hb in {1, Hkv, H}.
    With `window=w` each query row keeps the w allowed keys with the best
    key_bias + attn_bias (ties go to the later key). Returns o like q, or (o, lse) with
    `return_lse=True` (lse float32 (B, H, Sq)).
    """
    q, k, v, key_bias, attn_bias = _autocast_inputs(q, k, v, key_bias, attn_bias)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # traced calls validate inside the custom ops
        problem, inputs = validate(
            q, k, v, key_bias=key_bias, window=window, attn_bias=attn_bias,
            attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal,
            scale=scale, softcap=softcap, return_lse=return_lse,
        )
    chunk = _batch_chunk(q)
    if chunk is not None:
        o, lse = _in_batch_chunks(
            chunk, q, k, v, key_bias=key_bias, window=window, attn_bias=attn_bias,
            attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal,
            scale=scale, softcap=softcap, backend=backend)
        return (o, lse) if return_lse else o
    if compiling:
        # Traced models call the custom ops; validation and dispatch run inside them.
        from .compiled import attention_traceable

        o, lse = attention_traceable(q, k, v, key_bias, attn_bias, attn_mask, key_padding_mask,
                                     window, causal, scale, softcap, backend)
        return (o, lse) if return_lse else o
    chosen = dispatch.choose(problem, backend)
    o, lse = autograd.run(problem, inputs, chosen)
    return (o, lse) if return_lse else o


# A CUDA grid holds at most 65535 programs along y, where the GPU kernels put batch x heads
# (and the plan its batch x plan heads): larger calls run as several calls.
MAX_GPU_BATCH_HEADS = 65535
GRID_LIMITED_DEVICES = ("cuda",)


def _batch_chunk(q) -> Optional[int]:
    """Batch entries per call where the whole batch would exceed MAX_GPU_BATCH_HEADS, else
    None (the call runs as it is)."""
    if not (isinstance(q, torch.Tensor) and q.dim() == 4
            and q.device.type in GRID_LIMITED_DEVICES):
        return None
    batch, heads = q.shape[0], q.shape[2]
    if batch <= 1 or batch * heads <= MAX_GPU_BATCH_HEADS:
        return None
    return max(1, MAX_GPU_BATCH_HEADS // heads)


def _in_batch_chunks(chunk: int, q, k, v, **options):
    """(o, lse) of the call made as calls on `chunk` batch entries each: batch entries never
    interact, inputs with a batch dim of 1 broadcast to every chunk, and autograd sums their
    gradients over the chunks."""
    batch = q.shape[0]

    def part(t, start):
        sliced = isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch
        return t[start:start + chunk] if sliced else t

    outputs = [
        attention(part(q, start), part(k, start), part(v, start), return_lse=True,
                  **{name: part(t, start) for name, t in options.items()})
        for start in range(0, batch, chunk)]
    return torch.cat([o for o, _ in outputs]), torch.cat([lse for _, lse in outputs])


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_inputs(q, k, v, key_bias, attn_bias):
    """Under torch.autocast, the floating inputs in autocast's dtype, as SDPA takes them
    (float64 and tensors on other devices stay as they are; autograd carries the gradients
    back through the casts). Anything else is left for validation to report."""
    if not isinstance(q, torch.Tensor):
        return q, k, v, key_bias, attn_bias
    dtype = autocast_dtype(q.device.type)
    if dtype is None:
        return q, k, v, key_bias, attn_bias
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
        and t.device.type == q.device.type else t
        for t in (q, k, v, key_bias, attn_bias))


def explain(q, k, v, **kwargs) -> dict[str, list[str]]:
    """Per backend, the reasons it could not serve `attention(q, k, v, **kwargs)`.

    An empty list means the backend can serve the call. The `backend` keyword is ignored.
    """
    kwargs.pop("backend", None)
    problem, _ = validate(q, k, v, **kwargs)
    return dispatch.explain(problem)
