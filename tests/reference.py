"""Dense float64 reference written straight from SPEC sections 2-4.

Independent of the package's code paths: it materialises every (row, key) score, selects with
a per-row sort and lets torch.autograd produce the gradients of SPEC section 5.
"""

from __future__ import annotations

import math

import torch


def _heads(t, heads):
    """(b, h, ...) with h in {1, Hkv, H} -> (b, H, ...), query head i reads i // (H // h)."""
    h = t.shape[1]
    return t.repeat_interleave(heads // h, dim=1) if h not in (1, heads) else t


def reference_attention(q, k, v, *, key_bias=None, window=None, attn_bias=None, attn_mask=None,
                        key_padding_mask=None, causal=False, scale=None, softcap=None):
    """Return (o, lse) in float64 from float64 copies of the inputs (grads flow to them)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.double().transpose(1, 2)  # (B, H, Sq, D)
    kh = k.double().transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    vh = v.double().transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    t = scale * qh @ kh.transpose(-1, -2)
    if softcap is not None:
        t = softcap * torch.tanh(t / softcap)
    s = t
    sel = torch.zeros(b, h, sq, sk, dtype=torch.float32)
    if attn_bias is not None:
        s = s + _heads(attn_bias.double(), h)
        sel = sel + _heads(attn_bias.detach().float(), h)
    if key_bias is not None:
        s = s + _heads(key_bias.double(), h)[:, :, None, :]
        sel = sel + _heads(key_bias.detach().float(), h)[:, :, None, :]

    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(b, h, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= j <= i + (sk - sq)
    if attn_mask is not None:
        allowed &= _heads(attn_mask.cpu(), h)
    if key_padding_mask is not None:
        allowed &= key_padding_mask.cpu()[:, None, None, :]

    kept = allowed.clone()
    if window is not None:
        # Rank by (sel, j) descending: sort by j descending first, then stably by sel.
        by_index = torch.arange(sk - 1, -1, -1)
        sel_rev = sel.cpu()[..., by_index]
        order = torch.sort(sel_rev, dim=-1, descending=True, stable=True).indices
        order = by_index[order]
        allowed_sorted = allowed.gather(-1, order)
        # keep the first `window` allowed keys in that order
        position = torch.cumsum(allowed_sorted.long(), -1)
        keep_sorted = allowed_sorted & (position <= window)
        kept = torch.zeros_like(allowed).scatter(-1, order, keep_sorted)

    kept = kept.to(q.device)
    has_key = kept.any(-1, keepdim=True)
    # Rows with no kept key: o = 0, lse = -inf, and no NaN in their gradients.
    s = torch.where(has_key, s.masked_fill(~kept, float("-inf")), torch.zeros_like(s))
    lse_rows = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(kept, torch.exp(s - lse_rows), torch.zeros_like(s))
    lse = torch.where(has_key, lse_rows, torch.full_like(lse_rows, float("-inf")))[..., 0]
    o = (p @ vh).transpose(1, 2)
    return o, lse
