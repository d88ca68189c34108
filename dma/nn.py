"""The model layer: DMA key scores from values, and an attention module that uses them.

`key_scores` computes the paper's per-key score delta from the value vectors;
`DynamicMaskAttention` wires q/k/v/o projections, optional RoPE, GQA and the key scores into
`dma.attention`. With A = 0 every key scores the same, so `window=w` is sliding-window
attention (SPEC's tie rule keeps the latest w keys); training moves A and the score
projection so that useful keys outlive the window.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .api import attention
from .selection import best_first_order


def key_scores(v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor],
               A: torch.Tensor, form: str = "softplus") -> torch.Tensor:
    """DMA key score delta per (batch, kv head, key), shape (B, Hkv, Sk).

    v: (B, Sk, Hkv, D). The values of all kv heads at a position are concatenated
    (v_flat, Hkv * D features) and projected to one score per kv head:
    z = v_flat @ proj_weight.T + proj_bias with proj_weight (Hkv, Hkv * D), then
    delta = A * softplus(z) ("softplus") or exp(A * softplus(z)) ("exp").
    Differentiable in v, proj_weight, proj_bias and A. Selection compares these scores in
    float32 (dma.attention does that), so half-precision scores rank as their float32 values.
    """
    if v.dim() != 4:
        raise ValueError(f"v must be (B, Sk, Hkv, D); got shape {tuple(v.shape)}")
    b, sk, hkv, d = v.shape
    if tuple(proj_weight.shape) != (hkv, hkv * d):
        raise ValueError(f"proj_weight must have shape (Hkv, Hkv * D) = ({hkv}, {hkv * d}); "
                         f"got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (hkv,):
        raise ValueError(f"proj_bias must have shape (Hkv,) = ({hkv},); got "
                         f"{tuple(proj_bias.shape)}")
    if tuple(A.shape) != (hkv,):
        raise ValueError(f"A must have shape (Hkv,) = ({hkv},); got {tuple(A.shape)}")
    if form not in ("softplus", "exp"):
        raise ValueError(f"form must be 'softplus' or 'exp'; got {form!r}")
    z = F.linear(v.reshape(b, sk, hkv * d), proj_weight, proj_bias)  # (B, Sk, Hkv)
    delta = A * F.softplus(z)
    if form == "exp":
        delta = torch.exp(delta)
    return delta.transpose(1, 2)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of (B, S, H, D) at integer positions (S,), D even."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]  # (S, D/2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class DecodeCache:
    """Bounded key/value cache for token-by-token or chunked decoding of one layer.

    A key that leaves a row's window never returns (SPEC section 3), so after each step the
    cache keeps, per (batch, kv head), only the keys the newest row keeps: at most `window`
    of them, whatever the number of tokens decoded. Each head's keys are stored in their
    original order, so causality and the later-key-wins tie rule hold on the compacted
    slots. Key padding is not supported while decoding.
    """

    def __init__(self, window: int):
        if window is None or window < 1:
            raise ValueError(f"DecodeCache needs a window >= 1; got {window}")
        self.window = window
        self.k = self.v = self.scores = self.positions = None  # (B, n, Hkv, D) / (B, Hkv, n)
        self.length = 0  # tokens seen so far

    @property
    def size(self) -> int:
        """Keys held per (batch, kv head)."""
        return 0 if self.k is None else self.k.shape[1]

    def extend(self, k, v, scores):
        """Cached keys followed by the new ones: (k, v, scores, positions) for one step."""
        b, n_new, hkv, _ = k.shape
        new_pos = torch.arange(self.length, self.length + n_new, device=k.device)
        new_pos = new_pos.expand(b, hkv, n_new)
        if self.k is None:
            return k, v, scores, new_pos
        return (torch.cat([self.k, k], 1), torch.cat([self.v, v], 1),
                torch.cat([self.scores, scores], 2), torch.cat([self.positions, new_pos], 2))

    def keep_best(self, k, v, scores, positions):
        """Keep, per (batch, kv head), the `window` best keys by (score, position), of what
        `extend` returned. No host sync: a decoding step queues its work and returns."""
        self.length += positions.shape[2] - self.size  # the new tokens' count, on the host
        b, n, hkv, d = k.shape
        if n > self.window:
            flat = scores.detach().float().reshape(b * hkv, n)
            # best_first_order breaks ties by slot, and slots are in position order.
            best = best_first_order(flat, torch.ones_like(flat, dtype=torch.bool))
            slots = best[:, : self.window].sort(dim=-1).values.reshape(b, hkv, self.window)
            rows = slots.transpose(1, 2)[..., None].expand(b, self.window, hkv, d)
            k, v = k.gather(1, rows), v.gather(1, rows)
            scores, positions = scores.gather(2, slots), positions.gather(2, slots)
        self.k, self.v, self.scores, self.positions = k, v, scores, positions


class DynamicMaskAttention(nn.Module):
    """Causal self-attention with a dynamic mask: (batch, seq, hidden) -> same shape.

    Parameters: q/k/v/o projections (bias-free), the value-to-score projection
    `score_proj` (Hkv, Hkv * head_dim) with bias, and `A` (Hkv,). Initialisation: A = 0, so
    every key scores the same and the layer starts as sliding-window attention; the score
    projection keeps nn.Linear's random weights (zero bias) so that the scores differ per key
    and A gets a gradient from the first step (equal scores would only shift every logit of a
    row alike, which softmax ignores).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, window: Optional[int] = 256, rope: bool = True,
                 score_form: str = "softplus", causal: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim; got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window, self.rope, self.score_form = window, rope, score_form
        self.causal, self.backend = causal, backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.score_proj = nn.Linear(num_kv_heads * head_dim, num_kv_heads)
        nn.init.zeros_(self.score_proj.bias)
        self.A = nn.Parameter(torch.zeros(num_kv_heads))

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q, k, v (B, S, heads, D) and key scores (B, Hkv, S) of hidden states x."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        scores = key_scores(v, self.score_proj.weight, self.score_proj.bias, self.A,
                            self.score_form)
        return q, k, v, scores.to(q.dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        positions = torch.arange(x.shape[1], device=x.device)
        q, k, v, scores = self.project(x, positions)
        o = attention(q, k, v, key_bias=scores, window=self.window, causal=self.causal,
                      key_padding_mask=key_padding_mask, backend=self.backend)
        return self.o_proj(o.reshape(x.shape[0], x.shape[1], -1))

    def step(self, x: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Decode a chunk of new tokens x (B, n, hidden) against `cache`, updating it.

        Gives the same rows as `forward` over the whole sequence; memory stays bounded by
        the window however many tokens are decoded.
        """
        if not self.causal:
            raise ValueError("step() decodes causal layers only")
        if cache.window != self.window:
            raise ValueError(f"cache window {cache.window} != layer window {self.window}")
        b, n, _ = x.shape
        positions = torch.arange(cache.length, cache.length + n, device=x.device)
        q, k, v, scores = self.project(x, positions)
        k_all, v_all, s_all, pos_all = cache.extend(k, v, scores)
        o = attention(q, k_all, v_all, key_bias=s_all, window=self.window, causal=True,
                      backend=self.backend)
        cache.keep_best(k_all.detach(), v_all.detach(), s_all.detach(), pos_all)
        return self.o_proj(o.reshape(b, n, -1))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window={self.window}, rope={self.rope}, "
                f"score_form={self.score_form!r}, scale={1 / math.sqrt(self.head_dim):.4g}")
