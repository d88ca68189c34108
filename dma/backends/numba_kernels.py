"""Numba kernels of the numba backend (CPU).

They follow the triton kernels' structure: a forward and a dq pass over query blocks, and a
dk/dv pass over key blocks, each walking either the block's candidate keys from the selection
plan (the DMA case) or consecutive keys with the masks applied per element. `_kept_bias` is
the one place that decides whether (row i, key j) is kept and adds the biases (SPEC section 2).

On a CPU the backward needs no tiles: the dk/dv pass walks, for each key, exactly the rows
that keep it ([first_row_j, end_row_j) in the DMA case), so work is the kept pairs and every
output element has one writer (no races, deterministic).

Arrays arrive in the compute dtype (float32, float64 for float64 inputs), heads before
sequence: q (B, H, Sq, D), k and v (B, Hkv, Sk, D). A bias or mask is passed at its own shape
with a 0/1 multiplier per dim (0 = broadcast), so broadcast dims are never materialised.
fastmath keeps inf/nan semantics (masked scores are -inf).
"""

import math

import numpy as np
from numba import njit, prange

FASTMATH = {"nsz", "arcp", "contract", "reassoc", "afn"}


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot(x, y):
    acc = 0.0
    for d in range(x.shape[0]):
        acc += x[d] * y[d]
    return acc


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _kept_bias(b, h, i, j, interval, causal, causal_offset, kb, kb_m, ab, ab_m, am, am_m,
               pad, has_pad, first, end, plan_m):
    """(kept, bias) of row i and key j for query head h of batch b."""
    if interval:
        pb = b * plan_m[0]
        ph = h // plan_m[1]
        if i < first[pb, ph, j] or i >= end[pb, ph, j]:
            return False, 0.0
    else:
        if causal and j > i + causal_offset:
            return False, 0.0
        if am_m[4] and not am[b * am_m[0], h // am_m[1], i * am_m[2], j * am_m[3]]:
            return False, 0.0
        if has_pad and not pad[b, j]:
            return False, 0.0
    bias = 0.0
    if kb_m[2]:
        bias += kb[b * kb_m[0], h // kb_m[1], j]
    if ab_m[4]:
        bias += ab[b * ab_m[0], h // ab_m[1], i * ab_m[2], j * ab_m[3]]
    return True, bias


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _key_at(b, h, block, slot, interval, cand, plan_m):
    if interval:
        return cand[b * plan_m[0], h // plan_m[1], block, slot]
    return slot


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _slots(b, h, i, block, interval, causal, causal_offset, seqlen_k, count, plan_m):
    """Key slots row i walks: its block's candidate count, or its causal key limit."""
    if interval:
        return count[b * plan_m[0], h // plan_m[1], block]
    if causal:
        return max(0, min(seqlen_k, i + causal_offset + 1))
    return seqlen_k


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _score(qrow, krow, scale, softcap):
    """(s before biases, tanh(t / softcap)) for one pair; softcap <= 0 means none."""
    t = scale * _dot(qrow, krow)
    th = 0.0
    if softcap > 0.0:
        th = math.tanh(t / softcap)
        t = softcap * th
    return t, th


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward_kernel(q, k, v, out, lse, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end,
                   cand, count, plan_m, interval, causal, causal_offset, scale, softcap, block_m):
    batch, heads, seqlen_q, dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_blocks = (seqlen_q + block_m - 1) // block_m
    for task in prange(batch * heads * n_blocks):
        b = task // (heads * n_blocks)
        h = (task // n_blocks) % heads
        block = task % n_blocks
        hk = h // group
        acc = np.zeros(dim, dtype=q.dtype)
        for i in range(block * block_m, min(seqlen_q, (block + 1) * block_m)):
            acc[:] = 0.0
            m = -np.inf
            total = 0.0
            n = _slots(b, h, i, block, interval, causal, causal_offset, seqlen_k, count, plan_m)
            for slot in range(n):
                j = _key_at(b, h, block, slot, interval, cand, plan_m)
                kept, bias = _kept_bias(b, h, i, j, interval, causal, causal_offset, kb, kb_m,
                                        ab, ab_m, am, am_m, pad, has_pad, first, end, plan_m)
                if not kept:
                    continue
                t, _ = _score(q[b, h, i], k[b, hk, j], scale, softcap)
                s = t + bias
                if s == -np.inf:
                    continue
                if s > m:  # new running max: rescale what has been summed so far
                    correction = math.exp(m - s) if m > -np.inf else 0.0
                    total *= correction
                    for d in range(dim):
                        acc[d] *= correction
                    m = s
                p = math.exp(s - m)
                total += p
                for d in range(dim):
                    acc[d] += p * v[b, hk, j, d]
            if total > 0.0:
                for d in range(dim):
                    out[b, h, i, d] = acc[d] / total
                lse[b, h, i] = m + math.log(total)
            else:
                out[b, h, i, :] = 0.0
                lse[b, h, i] = -np.inf


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def dq_kernel(q, k, v, do, lse, delta, dq, dab, need_dab, kb, kb_m, ab, ab_m, am, am_m, pad,
              has_pad, first, end, cand, count, plan_m, interval, causal, causal_offset, scale,
              softcap, block_m):
    """dq, and d attn_bias at full (B, H, Sq, Sk) size when needed, over query blocks."""
    batch, heads, seqlen_q, dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_blocks = (seqlen_q + block_m - 1) // block_m
    for task in prange(batch * heads * n_blocks):
        b = task // (heads * n_blocks)
        h = (task // n_blocks) % heads
        block = task % n_blocks
        hk = h // group
        for i in range(block * block_m, min(seqlen_q, (block + 1) * block_m)):
            dq[b, h, i, :] = 0.0
            if lse[b, h, i] == -np.inf:
                continue
            n = _slots(b, h, i, block, interval, causal, causal_offset, seqlen_k, count, plan_m)
            for slot in range(n):
                j = _key_at(b, h, block, slot, interval, cand, plan_m)
                kept, bias = _kept_bias(b, h, i, j, interval, causal, causal_offset, kb, kb_m,
                                        ab, ab_m, am, am_m, pad, has_pad, first, end, plan_m)
                if not kept:
                    continue
                t, th = _score(q[b, h, i], k[b, hk, j], scale, softcap)
                p = math.exp(t + bias - lse[b, h, i])
                ds = p * (_dot(do[b, h, i], v[b, hk, j]) - delta[b, h, i])
                if need_dab:
                    dab[b, h, i, j] = ds
                dt = ds * (1.0 - th * th) if softcap > 0.0 else ds
                for d in range(dim):
                    dq[b, h, i, d] += scale * dt * k[b, hk, j, d]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def dkdv_kernel(q, k, v, do, lse, delta, dk, dv, dkb, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad,
                first, end, plan_m, interval, causal, causal_offset, scale, softcap, block_n):
    """dk, dv (summed over each kv group) and d key_bias per query head, over key blocks:
    each key walks the rows that may keep it."""
    batch, heads, seqlen_q, dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_blocks = (seqlen_k + block_n - 1) // block_n
    for task in prange(batch * kv_heads * n_blocks):
        b = task // (kv_heads * n_blocks)
        hk = (task // n_blocks) % kv_heads
        block = task % n_blocks
        for j in range(block * block_n, min(seqlen_k, (block + 1) * block_n)):
            dk[b, hk, j, :] = 0.0
            dv[b, hk, j, :] = 0.0
            for g in range(group):
                h = hk * group + g
                if interval:
                    row_lo = first[b * plan_m[0], h // plan_m[1], j]
                    row_hi = end[b * plan_m[0], h // plan_m[1], j]
                else:
                    row_lo = max(0, j - causal_offset) if causal else 0
                    row_hi = seqlen_q
                d_bias = 0.0
                for i in range(row_lo, row_hi):
                    kept, bias = _kept_bias(b, h, i, j, interval, causal, causal_offset, kb,
                                            kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end,
                                            plan_m)
                    if not kept:
                        continue
                    t, th = _score(q[b, h, i], k[b, hk, j], scale, softcap)
                    p = math.exp(t + bias - lse[b, h, i])
                    ds = p * (_dot(do[b, h, i], v[b, hk, j]) - delta[b, h, i])
                    d_bias += ds
                    dt = ds * (1.0 - th * th) if softcap > 0.0 else ds
                    for d in range(dim):
                        dv[b, hk, j, d] += p * do[b, h, i, d]
                        dk[b, hk, j, d] += scale * dt * q[b, h, i, d]
                dkb[b, h, j] = d_bias
