"""Head-layout helpers shared by the selection plan and the backends.

A bias or mask may carry 1, Hkv or H heads; query head h reads head h // (H // heads). Inside
the backends query heads are grouped as (Hkv, G) with G = H // Hkv, so a tensor with a head
dim of 1, Hkv or H views as (1, 1), (Hkv, 1) or (Hkv, G).
"""

from __future__ import annotations

import torch


def to_query_heads(t: torch.Tensor, heads: int, dim: int = 1) -> torch.Tensor:
    """Widen a head dim of size Hkv to H; sizes 1 and H stay as they are."""
    size = t.shape[dim]
    if size in (1, heads):
        return t
    return t.repeat_interleave(heads // size, dim=dim)


def expand_heads(t: torch.Tensor, heads_to: int, heads: int, dim: int = 1) -> torch.Tensor:
    """Map a head dim of size 1, Hkv or H to exactly `heads_to` heads."""
    if t.shape[dim] == heads_to:
        return t
    if t.shape[dim] == 1:
        shape = list(t.shape)
        shape[dim] = heads_to
        return t.expand(*shape)
    return to_query_heads(t, heads, dim)


def split_heads(t: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """View dim 1 (size 1, Hkv or H) as two dims (Hkv or 1, G or 1)."""
    b, h = t.shape[:2]
    rest = t.shape[2:]
    if h == heads:
        return t.reshape(b, kv_heads, heads // kv_heads, *rest)
    if h == kv_heads:
        return t.reshape(b, kv_heads, 1, *rest)
    return t.reshape(b, 1, 1, *rest)


def sum_to_heads(t: torch.Tensor, batch: int, heads: int, kv_heads: int) -> torch.Tensor:
    """Sum a (B, Hkv, G, ...) gradient down to (batch, heads, ...) with batch in {1, B} and
    heads in {1, Hkv, H}: the inverse of broadcasting through `split_heads`."""
    if batch == 1 and t.shape[0] != 1:
        t = t.sum(0, keepdim=True)
    b, hkv, g = t.shape[:3]
    rest = t.shape[3:]
    if heads == hkv * g:
        return t.reshape(b, heads, *rest)
    if heads == kv_heads and g != 1:
        t = t.sum(2)
    elif heads == kv_heads:
        t = t[:, :, 0]
    else:
        t = t.sum((1, 2))[:, None]
    return t.reshape(b, heads, *rest)


def reduce_bias_grad(full: torch.Tensor, bias: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum a per-query-head gradient (B, H, ...) down to `bias`'s own broadcast shape and
    dtype: key_bias (B or 1, Hb, Sk) or attn_bias (b, h, Sq or 1, Sk or 1)."""
    heads = full.shape[1]
    grad = sum_to_heads(split_heads(full, kv_heads, heads), bias.shape[0], bias.shape[1],
                        kv_heads)
    for dim in range(2, bias.dim()):
        if bias.shape[dim] == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad.to(bias.dtype)
