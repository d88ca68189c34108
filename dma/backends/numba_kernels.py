"""Numba kernels of the numba backend (CPU).

They follow the triton kernels' structure: a forward and a dq pass over query blocks, and a
dk/dv pass over key blocks, each walking either the block's candidate keys from the selection
plan (the DMA case) or consecutive keys with the masks applied per element. `_kept_bias` is
the one place that decides whether (row i, key j) is kept and adds the biases (SPEC section 2).

The query-block kernels gather a tile of keys into contiguous (D, tile) copies and compute
scores as rank-1 updates, so their inner loops run over keys and vectorise. The dk/dv pass
walks, for each key, exactly the rows that may keep it ([first_row_j, end_row_j) in the DMA
case) in chunks whose inner loops run over rows, so work is the kept pairs and every output
element has one writer (no races, deterministic).

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


KEY_TILE = 64  # keys gathered per tile of the query-block kernels


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _gather_tile(b, hk, h, block, start, n_tile, interval, cand, plan_m, k, v, keys, k_cols,
                 k_rows, v_cols):
    """Copy a tile of (gathered) keys: K as (D, tile) and (tile, D), V as (D, tile), so the
    inner loops below run over contiguous memory and vectorise."""
    for t in range(n_tile):
        j = _key_at(b, h, block, start + t, interval, cand, plan_m)
        keys[t] = j
        for d in range(k.shape[3]):
            k_cols[d, t] = k[b, hk, j, d]
            k_rows[t, d] = k[b, hk, j, d]
            v_cols[d, t] = v[b, hk, j, d]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _tile_scores(b, h, row0, n_rows, keys, n_tile, q_block, k_cols, scores, tanh_out,
                 interval, causal, causal_offset, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad,
                 first, end, plan_m, scale, softcap):
    """scores[i, t] = s of (row0 + i, keys[t]) or -inf where not kept; tanh for softcap."""
    dim = q_block.shape[1]
    for i in range(n_rows):
        for t in range(n_tile):
            scores[i, t] = 0.0
        for d in range(dim):  # rank-1 updates: the inner loop runs over keys and vectorises
            x = q_block[i, d]
            for t in range(n_tile):
                scores[i, t] += x * k_cols[d, t]
        for t in range(n_tile):
            kept, bias = _kept_bias(b, h, row0 + i, keys[t], interval, causal, causal_offset,
                                    kb, kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end,
                                    plan_m)
            if not kept:
                scores[i, t] = -np.inf
                continue
            x = scale * scores[i, t]
            if softcap > 0.0:
                th = math.tanh(x / softcap)
                tanh_out[i, t] = th
                x = softcap * th
            scores[i, t] = x + bias


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_slots(b, h, block, row_end, interval, causal, causal_offset, seqlen_k, count,
                 plan_m):
    """Key slots a query block walks: its candidates, or keys up to its last row's limit."""
    return _slots(b, h, row_end - 1, block, interval, causal, causal_offset, seqlen_k, count,
                  plan_m)


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
        row0 = block * block_m
        row_end = min(seqlen_q, row0 + block_m)
        n_rows = row_end - row0
        q_block = q[b, h, row0:row_end]
        m = np.full(n_rows, -np.inf, dtype=q.dtype)
        total = np.zeros(n_rows, dtype=q.dtype)
        acc = np.zeros((n_rows, dim), dtype=q.dtype)
        keys = np.empty(KEY_TILE, dtype=np.int64)
        k_cols = np.empty((dim, KEY_TILE), dtype=q.dtype)
        k_rows = np.empty((KEY_TILE, dim), dtype=q.dtype)
        v_cols = np.empty((dim, KEY_TILE), dtype=q.dtype)
        scores = np.empty((n_rows, KEY_TILE), dtype=q.dtype)
        tanh_out = np.empty((n_rows, KEY_TILE), dtype=q.dtype)
        n = _block_slots(b, h, block, row_end, interval, causal, causal_offset, seqlen_k, count,
                         plan_m)
        for start in range(0, n, KEY_TILE):
            n_tile = min(KEY_TILE, n - start)
            _gather_tile(b, hk, h, block, start, n_tile, interval, cand, plan_m, k, v, keys,
                         k_cols, k_rows, v_cols)
            _tile_scores(b, h, row0, n_rows, keys, n_tile, q_block, k_cols, scores, tanh_out,
                         interval, causal, causal_offset, kb, kb_m, ab, ab_m, am, am_m, pad,
                         has_pad, first, end, plan_m, scale, softcap)
            for i in range(n_rows):
                tile_max = -np.inf
                for t in range(n_tile):
                    tile_max = max(tile_max, scores[i, t])
                if tile_max == -np.inf:
                    continue
                if tile_max > m[i]:  # new running max: rescale what was summed so far
                    correction = math.exp(m[i] - tile_max) if m[i] > -np.inf else 0.0
                    total[i] *= correction
                    for d in range(dim):
                        acc[i, d] *= correction
                    m[i] = tile_max
                for t in range(n_tile):
                    p = math.exp(scores[i, t] - m[i]) if scores[i, t] > -np.inf else 0.0
                    total[i] += p
                    if p != 0.0:
                        for d in range(dim):
                            acc[i, d] += p * v_cols[d, t]
        for i in range(n_rows):
            if total[i] > 0.0:
                for d in range(dim):
                    out[b, h, row0 + i, d] = acc[i, d] / total[i]
                lse[b, h, row0 + i] = m[i] + math.log(total[i])
            else:
                out[b, h, row0 + i, :] = 0.0
                lse[b, h, row0 + i] = -np.inf


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
        row0 = block * block_m
        row_end = min(seqlen_q, row0 + block_m)
        n_rows = row_end - row0
        q_block = q[b, h, row0:row_end]
        do_block = do[b, h, row0:row_end]
        acc = np.zeros((n_rows, dim), dtype=q.dtype)
        keys = np.empty(KEY_TILE, dtype=np.int64)
        k_cols = np.empty((dim, KEY_TILE), dtype=q.dtype)
        k_rows = np.empty((KEY_TILE, dim), dtype=q.dtype)
        v_cols = np.empty((dim, KEY_TILE), dtype=q.dtype)
        scores = np.empty((n_rows, KEY_TILE), dtype=q.dtype)
        tanh_out = np.empty((n_rows, KEY_TILE), dtype=q.dtype)
        dp = np.empty(KEY_TILE, dtype=q.dtype)
        n = _block_slots(b, h, block, row_end, interval, causal, causal_offset, seqlen_k, count,
                         plan_m)
        for start in range(0, n, KEY_TILE):
            n_tile = min(KEY_TILE, n - start)
            _gather_tile(b, hk, h, block, start, n_tile, interval, cand, plan_m, k, v, keys,
                         k_cols, k_rows, v_cols)
            _tile_scores(b, h, row0, n_rows, keys, n_tile, q_block, k_cols, scores, tanh_out,
                         interval, causal, causal_offset, kb, kb_m, ab, ab_m, am, am_m, pad,
                         has_pad, first, end, plan_m, scale, softcap)
            for i in range(n_rows):
                row_lse = lse[b, h, row0 + i]
                if row_lse == -np.inf:
                    continue
                for t in range(n_tile):
                    dp[t] = 0.0
                for d in range(dim):
                    x = do_block[i, d]
                    for t in range(n_tile):
                        dp[t] += x * v_cols[d, t]
                for t in range(n_tile):
                    if scores[i, t] == -np.inf:
                        continue
                    p = math.exp(scores[i, t] - row_lse)
                    ds = p * (dp[t] - delta[b, h, row0 + i])
                    if need_dab:
                        dab[b, h, row0 + i, keys[t]] = ds
                    dt = ds * (1.0 - tanh_out[i, t] ** 2) if softcap > 0.0 else ds
                    for d in range(dim):
                        acc[i, d] += dt * k_rows[t, d]
        for i in range(n_rows):
            for d in range(dim):
                dq[b, h, row0 + i, d] = scale * acc[i, d]


ROW_CHUNK = 64  # rows per chunk of the key-major dk/dv pass


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def dkdv_kernel(q_cols, k, v, do_cols, lse, delta, dk, dv, dkb, kb, kb_m, ab, ab_m, am, am_m,
                pad, has_pad, first, end, plan_m, interval, causal, causal_offset, scale,
                softcap, block_n):
    """dk, dv (summed over each kv group) and d key_bias per query head, over key blocks:
    each key walks exactly the rows that may keep it, in chunks whose inner loops run over
    rows. q_cols and do_cols are (B, H, D, Sq): rows contiguous per feature."""
    batch, heads, dim, seqlen_q = q_cols.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_blocks = (seqlen_k + block_n - 1) // block_n
    for task in prange(batch * kv_heads * n_blocks):
        b = task // (kv_heads * n_blocks)
        hk = (task // n_blocks) % kv_heads
        block = task % n_blocks
        s = np.empty(ROW_CHUNK, dtype=k.dtype)
        dp = np.empty(ROW_CHUNK, dtype=k.dtype)
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
                for r0 in range(row_lo, row_hi, ROW_CHUNK):
                    n = min(ROW_CHUNK, row_hi - r0)
                    for r in range(n):
                        s[r] = 0.0
                        dp[r] = 0.0
                    for d in range(dim):  # inner loops over rows vectorise
                        kd = k[b, hk, j, d]
                        vd = v[b, hk, j, d]
                        for r in range(n):
                            s[r] += q_cols[b, h, d, r0 + r] * kd
                            dp[r] += do_cols[b, h, d, r0 + r] * vd
                    for r in range(n):
                        i = r0 + r
                        kept, bias = _kept_bias(b, h, i, j, interval, causal, causal_offset,
                                                kb, kb_m, ab, ab_m, am, am_m, pad, has_pad,
                                                first, end, plan_m)
                        if not kept or lse[b, h, i] == -np.inf:
                            s[r] = 0.0  # p
                            dp[r] = 0.0  # dt
                            continue
                        t = scale * s[r]
                        th = 0.0
                        if softcap > 0.0:
                            th = math.tanh(t / softcap)
                            t = softcap * th
                        p = math.exp(t + bias - lse[b, h, i])
                        ds = p * (dp[r] - delta[b, h, i])
                        d_bias += ds
                        s[r] = p
                        dp[r] = ds * (1.0 - th * th) if softcap > 0.0 else ds
                    for d in range(dim):
                        acc_v = 0.0
                        acc_k = 0.0
                        for r in range(n):
                            acc_v += s[r] * do_cols[b, h, d, r0 + r]
                            acc_k += dp[r] * q_cols[b, h, d, r0 + r]
                        dv[b, hk, j, d] += acc_v
                        dk[b, hk, j, d] += scale * acc_k
                dkb[b, h, j] = d_bias
