"""Numba kernels of the numba backend (CPU).

They follow the triton kernels' structure: a forward and a dq pass over query blocks, each
walking key tiles (the block's candidate keys from the selection plan in the DMA case, the
live tiles of an explicit mask listed per block (tile_list; dma/tile_lists.py), consecutive
keys up to the causal limit otherwise), and a dk/dv pass over chunks of keys (under an
explicit mask, over each chunk's listed live row blocks), which by default computes dq too
(one-pass backward; dq_kernel serves deterministic mode).
Tile products go through BLAS (`numba_blas.matmul`, one single-threaded gemm call per
product, accumulating in place where it can), so the per-pair work is vectorised; the
elementwise parts (scores, masks, softmax) are plain loops that LLVM vectorises, with an exp
written for that (`_exp_shifted`). Score tiles are stored key-major, (keys, rows): every
per-row statistic (running max, sums) is then an elementwise update across a contiguous
column instead of a reduction along a row, which LLVM does not vectorise for max.

`_key_facts` and `_mask_scores` are the one place that decides whether (row i, key j) is kept
(SPEC section 2): every test that depends on the key alone folds into a per-key row interval
[first, end) (the plan's interval in the DMA case; the causal bound and key padding
otherwise), explicit masks and biases are read per element at their own shape.

dk/dv without races or atomics: a task owns a chunk of consecutive keys and visits, for each
query block, only the block's candidates inside the chunk (a binary search in the block's
ascending candidate list), so work is the kept pairs and every output element has one writer.
In the one-pass backward, dq rows get contributions from many chunks, so each thread adds into
its own partial dq (summed by the caller).

Arrays arrive in the compute dtype (float32, float64 for float64 inputs), heads before
sequence: q (B, H, Sq, D), k and v (B, Hkv, Sk, D). A bias or mask is passed at its own shape
with a 0/1 multiplier per dim (0 = broadcast), so broadcast dims are never materialised.
fastmath keeps inf/nan semantics (masked scores are -inf).
"""

import math

import numba
import numpy as np
from numba import njit, prange

from .numba_blas import matmul

FASTMATH = {"nsz", "arcp", "contract", "reassoc", "afn"}
BLOCK_N = 128  # keys per tile of the forward and dq
SUB_TILE = 256  # at most this many keys per tile product in the dk/dv pass

# 2^f for |f| <= 1/2: a degree-5 least-squares fit, relative error 2e-7 in float32.
_EXP2_POLY = (1.326697038704576e-03, 9.675459745553838e-03, 5.550742616000864e-02,
              2.4022121753560713e-01, 6.931469491610648e-01, 1.0000000710297006)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _exp_shifted(col, shift, bits):
    """col[r] = exp(col[r] - shift[r]) in place, for arguments <= 0 (-inf gives 0). float32
    goes through 2^n * poly(f) with the power of two built in the exponent bits (`bits`, an
    int32 scratch at least as long as col), which vectorises; float64 calls math.exp."""
    if col.itemsize == 8:  # float64
        for r in range(col.shape[0]):
            col[r] = math.exp(col[r] - shift[r])
        return
    c0, c1, c2, c3, c4, c5 = _EXP2_POLY
    for r in range(col.shape[0]):
        # t in [-127, 0]; truncating t - 1/2 rounds to nearest; n = -127 gives the power
        # of two 0.0, so exp(-inf) is exactly 0.
        t = max((col[r] - shift[r]) * np.float32(1.4426950408889634), np.float32(-127.0))
        n = np.int32(t - np.float32(0.5))
        f = t - np.float32(n)
        p = np.float32(c0)
        p = p * f + np.float32(c1)
        p = p * f + np.float32(c2)
        p = p * f + np.float32(c3)
        p = p * f + np.float32(c4)
        col[r] = p * f + np.float32(c5)
        bits[r] = (n + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for r in range(col.shape[0]):
        col[r] = col[r] * scale[r]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _key_facts(b, h, keys, n, first, end, kbv, kb, kb_m, pad, has_pad, plan_first, plan_end,
               plan_m, interval, causal, causal_offset, seqlen_q):
    """Per key of a tile: the row interval [first, end) that may keep it and its key_bias."""
    for c in range(n):
        j = keys[c]
        if interval:
            first[c] = plan_first[b * plan_m[0], h // plan_m[1], j]
            end[c] = plan_end[b * plan_m[0], h // plan_m[1], j]
        else:
            first[c] = j - causal_offset if causal else 0
            end[c] = 0 if has_pad and not pad[b, j] else seqlen_q
        kbv[c] = kb[b * kb_m[0], h // kb_m[1], j] if kb_m[2] else 0.0


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _mask_scores(st, th, b, h, row0, keys, first, end, kbv, ab, ab_m, am, am_m, scale, softcap,
                 whole):
    """st (keys x rows, k.q products) becomes scores with -inf where not kept; th gets
    tanh(t / softcap) for the softcap gradient (softcap <= 0: none). `whole`: a tile that the
    explicit mask allows whole, whose mask is not read."""
    n, rows = st.shape
    for c in range(n):
        col = st[c]
        multiplier = scale
        if softcap > 0.0:
            tanh_col = th[c]
            for r in range(rows):
                tanh_col[r] = math.tanh(col[r] * scale / softcap)
            for r in range(rows):
                col[r] = tanh_col[r]
            multiplier = softcap
        lo, hi, bias = first[c] - row0, end[c] - row0, kbv[c]
        for r in range(rows):  # branch-free, so it vectorises
            keep = (lo <= r) & (r < hi)
            col[r] = col[r] * multiplier + bias if keep else -np.inf
        test_mask = am_m[4] and not whole
        if ab_m[4] or test_mask:
            j = keys[c]
            for r in range(rows):
                if col[r] == -np.inf:
                    continue
                i = row0 + r
                if test_mask and not am[b * am_m[0], h // am_m[1], i * am_m[2], j * am_m[3]]:
                    col[r] = -np.inf
                elif ab_m[4]:
                    col[r] += ab[b * ab_m[0], h // ab_m[1], i * ab_m[2], j * ab_m[3]]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _tile_keys(keys, b, h, block, start, n_slots, seqlen_k, cand, plan_m, interval, tile_list):
    """Key ids of a query block's tile at slot `start` (of n_slots): the block's candidates,
    the keys of its listed live tile (tile_list: `cand` lists tiles of BLOCK_N keys), or
    consecutive keys. Returns (how many keys, the first key when they are consecutive, else
    -1: gathered)."""
    if tile_list:
        key0 = cand[b * plan_m[0], h // plan_m[1], block, start // BLOCK_N] * BLOCK_N
        n = min(BLOCK_N, seqlen_k - key0)
    else:
        key0, n = start, min(BLOCK_N, n_slots - start)
    for c in range(n):
        keys[c] = cand[b * plan_m[0], h // plan_m[1], block, start + c] if interval else key0 + c
    return n, -1 if interval else key0


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _whole_tile(b, h, block, start, full, plan_m, tile_list):
    """Whether a query block's tile at slot `start` is one that the explicit mask (and
    causality) allow whole: the first full[block] listed tiles."""
    return tile_list and start // BLOCK_N < full[b * plan_m[0], h // plan_m[1], block]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _gather(dst, src, keys, n):
    """Rows keys[:n] of src (S, D) as a contiguous (n, D) array."""
    out = dst[:n * src.shape[1]].reshape(n, src.shape[1])
    for c in range(n):
        out[c, :] = src[keys[c], :]
    return out


@njit(cache=True, fastmath=FASTMATH)  # a plain call: numba cannot inline this many arguments
def _scored_tile(gemm, st, th, qb, k_head, v_head, keys, n, start, k_buf, v_buf, kfirst, kend,
                 kbv, b, h, row0, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end, plan_m,
                 interval, causal, causal_offset, seqlen_q, scale, softcap, whole):
    """One key tile of every kernel: the keys' facts, their K and V rows ((n, D) views of
    k_head and v_head from `start` when the keys are consecutive, i.e. start >= 0, else
    gathered into k_buf and v_buf) and the tile's masked scores, key-major, in st (n x rows),
    the mask unread on a `whole` tile. Returns (kt, vt)."""
    _key_facts(b, h, keys, n, kfirst, kend, kbv, kb, kb_m, pad, has_pad, first, end, plan_m,
               interval, causal, causal_offset, seqlen_q)
    if start >= 0:
        kt, vt = k_head[start:start + n], v_head[start:start + n]
    else:
        kt, vt = _gather(k_buf, k_head, keys, n), _gather(v_buf, v_head, keys, n)
    matmul(gemm, kt, False, qb, True, st, False)
    _mask_scores(st, th, b, h, row0, keys, kfirst, kend, kbv, ab, ab_m, am, am_m, scale, softcap,
                 whole)
    return kt, vt


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_slots(b, h, block, block_m, interval, tile_list, causal, causal_offset, seqlen_q,
                 seqlen_k, count, plan_m):
    """How many key slots a query block walks: its candidate count, its live tiles' keys, or
    its causal limit."""
    if interval:
        return count[b * plan_m[0], h // plan_m[1], block]
    if tile_list:
        return count[b * plan_m[0], h // plan_m[1], block] * BLOCK_N
    if causal:
        last_row = min(seqlen_q, (block + 1) * block_m) - 1
        return max(0, min(seqlen_k, last_row + causal_offset + 1))
    return seqlen_k


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward_kernel(gemm, q, k, v, out, lse, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad, first,
                   end, cand, count, full, plan_m, interval, tile_list, causal, causal_offset,
                   scale, softcap, block_m):
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
        rows = min(seqlen_q, row0 + block_m) - row0
        qb = q[b, h, row0:row0 + rows]
        acc = np.zeros((rows, dim), q.dtype)
        m = np.full(rows, -np.inf, q.dtype)
        m_new, m_safe = np.empty(rows, q.dtype), np.empty(rows, q.dtype)
        total = np.zeros(rows, q.dtype)
        alpha = np.empty(rows, q.dtype)
        keys = np.empty(BLOCK_N, np.int64)
        kfirst, kend = np.empty(BLOCK_N, np.int64), np.empty(BLOCK_N, np.int64)
        kbv = np.empty(BLOCK_N, q.dtype)
        s_buf = np.empty(rows * BLOCK_N, q.dtype)
        th_buf = np.empty(rows * BLOCK_N, q.dtype)
        bits = np.empty(rows, np.int32)
        k_buf, v_buf = np.empty(BLOCK_N * dim, q.dtype), np.empty(BLOCK_N * dim, q.dtype)
        n_slots = _block_slots(b, h, block, block_m, interval, tile_list, causal, causal_offset,
                               seqlen_q, seqlen_k, count, plan_m)
        for start in range(0, n_slots, BLOCK_N):
            n, view_from = _tile_keys(keys, b, h, block, start, n_slots, seqlen_k, cand, plan_m,
                                      interval, tile_list)
            st = s_buf[:n * rows].reshape(n, rows)
            kt, vt = _scored_tile(
                gemm, st, th_buf[:n * rows].reshape(n, rows), qb, k[b, hk], v[b, hk], keys, n,
                view_from, k_buf, v_buf, kfirst, kend, kbv, b, h, row0, kb,
                kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end, plan_m, interval, causal,
                causal_offset, seqlen_q, scale, softcap,
                _whole_tile(b, h, block, start, full, plan_m, tile_list))
            # Online softmax, key-major: running max, then probabilities shifted by it.
            m_new[:] = m
            for c in range(n):
                col = st[c]
                for r in range(rows):
                    m_new[r] = max(m_new[r], col[r])
            for r in range(rows):
                m_safe[r] = m_new[r] if m_new[r] > -np.inf else 0.0
                alpha[r] = math.exp(m[r] - m_safe[r])
                m[r] = m_new[r]
                total[r] *= alpha[r]
            for c in range(n):
                col = st[c]
                _exp_shifted(col, m_safe, bits)
                for r in range(rows):
                    total[r] += col[r]
            for r in range(rows):
                for d in range(dim):
                    acc[r, d] *= alpha[r]
            matmul(gemm, st, True, vt, False, acc, True)
        for r in range(rows):
            if total[r] > 0.0:
                out[b, h, row0 + r] = acc[r] / total[r]
                lse[b, h, row0 + r] = m[r] + math.log(total[r])
            else:
                out[b, h, row0 + r] = 0.0
                lse[b, h, row0 + r] = -np.inf


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _probabilities_and_grads(st, th, lse_rows, delta_rows, dp, softcap, bits):
    """From masked key-major scores st: p = exp(s - lse) into st, the score gradient (ds
    times the softcap derivative) into dp, and ds itself into th."""
    n, rows = st.shape
    for c in range(n):
        p, grad, ds_col = st[c], dp[c], th[c]
        _exp_shifted(p, lse_rows, bits)
        if softcap > 0.0:
            for r in range(rows):
                ds = p[r] * (grad[r] - delta_rows[r])
                grad[r] = ds * (1.0 - ds_col[r] * ds_col[r])
                ds_col[r] = ds
        else:
            for r in range(rows):
                ds = p[r] * (grad[r] - delta_rows[r])
                grad[r] = ds
                ds_col[r] = ds


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def dq_kernel(gemm, q, k, v, do, lse, delta, dq, dab, need_dab, kb, kb_m, ab, ab_m, am, am_m,
              pad, has_pad, first, end, cand, count, full, plan_m, interval, tile_list, causal,
              causal_offset, scale, softcap, block_m):
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
        rows = min(seqlen_q, row0 + block_m) - row0
        qb, dob = q[b, h, row0:row0 + rows], do[b, h, row0:row0 + rows]
        lse_rows = lse[b, h, row0:row0 + rows].copy()
        for r in range(rows):  # empty rows: p = exp(s - inf) = 0
            if lse_rows[r] == -np.inf:
                lse_rows[r] = np.inf
        delta_rows = delta[b, h, row0:row0 + rows]
        acc = np.zeros((rows, dim), q.dtype)
        keys = np.empty(BLOCK_N, np.int64)
        kfirst, kend = np.empty(BLOCK_N, np.int64), np.empty(BLOCK_N, np.int64)
        kbv = np.empty(BLOCK_N, q.dtype)
        s_buf, th_buf = np.empty(rows * BLOCK_N, q.dtype), np.empty(rows * BLOCK_N, q.dtype)
        dp_buf = np.empty(rows * BLOCK_N, q.dtype)
        bits = np.empty(rows, np.int32)
        k_buf, v_buf = np.empty(BLOCK_N * dim, q.dtype), np.empty(BLOCK_N * dim, q.dtype)
        n_slots = _block_slots(b, h, block, block_m, interval, tile_list, causal, causal_offset,
                               seqlen_q, seqlen_k, count, plan_m)
        for start in range(0, n_slots, BLOCK_N):
            n, view_from = _tile_keys(keys, b, h, block, start, n_slots, seqlen_k, cand, plan_m,
                                      interval, tile_list)
            st = s_buf[:n * rows].reshape(n, rows)
            th = th_buf[:n * rows].reshape(n, rows)
            dp = dp_buf[:n * rows].reshape(n, rows)
            kt, vt = _scored_tile(
                gemm, st, th, qb, k[b, hk], v[b, hk], keys, n, view_from, k_buf,
                v_buf, kfirst, kend, kbv, b, h, row0, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad,
                first, end, plan_m, interval, causal, causal_offset, seqlen_q, scale, softcap,
                _whole_tile(b, h, block, start, full, plan_m, tile_list))
            matmul(gemm, vt, False, dob, True, dp, False)
            _probabilities_and_grads(st, th, lse_rows, delta_rows, dp, softcap, bits)
            if need_dab:
                for c in range(n):
                    for r in range(rows):
                        dab[b, h, row0 + r, keys[c]] = th[c, r]
            matmul(gemm, dp, True, kt, False, acc, True)
        dq[b, h, row0:row0 + rows] = acc * scale


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def dkdv_kernel(gemm, q, k, v, do, lse, delta, dk, dv, dkb, dq_parts, with_dq, dab, need_dab,
                kb, kb_m, ab, ab_m, am, am_m, pad, has_pad, first, end, cand, count, full, plan_m,
                interval, tile_list, causal, causal_offset, scale, softcap, block_m, key_chunk):
    """dk, dv (summed over each kv group) and d key_bias per query head, one chunk of
    `key_chunk` consecutive keys per task: each query block contributes its candidates inside
    the chunk (larger chunks mean fewer, larger tile products per block). tile_list: `cand`
    lists per chunk the live row blocks of an explicit mask, those it allows whole first.

    with_dq (one-pass backward): the same tiles also add ds @ K into this thread's slice of
    dq_parts (threads, B, H, Sq, D; unscaled) and write d attn_bias when need_dab, so dq_kernel
    is not needed. The sum over threads depends on which thread ran which task, so dq may
    differ between runs in its last bits; dk, dv and d key_bias never do."""
    batch, heads, seqlen_q, dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_chunks = (seqlen_k + key_chunk - 1) // key_chunk
    for task in prange(batch * kv_heads * n_chunks):
        b = task // (kv_heads * n_chunks)
        hk = (task // n_chunks) % kv_heads
        chunk = task % n_chunks
        key0 = chunk * key_chunk
        key1 = min(seqlen_k, key0 + key_chunk)
        dk_acc = np.zeros((key1 - key0, dim), q.dtype)
        dv_acc = np.zeros((key1 - key0, dim), q.dtype)
        dkb_acc = np.zeros(key1 - key0, q.dtype)
        keys = np.empty(key_chunk, np.int64)
        kfirst, kend = np.empty(SUB_TILE, np.int64), np.empty(SUB_TILE, np.int64)
        kbv = np.empty(SUB_TILE, q.dtype)
        s_buf = np.empty(block_m * SUB_TILE, q.dtype)
        th_buf, dp_buf = np.empty_like(s_buf), np.empty_like(s_buf)
        bits = np.empty(block_m, np.int32)
        k_buf, v_buf = np.empty(SUB_TILE * dim, q.dtype), np.empty(SUB_TILE * dim, q.dtype)
        part_buf = np.empty(SUB_TILE * dim, q.dtype)
        lse_rows = np.empty(block_m, q.dtype)
        for g in range(group):
            h = hk * group + g
            dkb_acc[:] = 0.0
            # Blocks whose rows may keep a key of the chunk: listed, or a range of them.
            row_lo, row_hi = 0, seqlen_q
            if interval:
                row_lo, row_hi = seqlen_q, 0
                for j in range(key0, key1):
                    f = first[b * plan_m[0], h // plan_m[1], j]
                    e = end[b * plan_m[0], h // plan_m[1], j]
                    if e > f:
                        row_lo, row_hi = min(row_lo, f), max(row_hi, e)
            elif causal:
                row_lo = max(0, key0 - causal_offset)
            first_block, n_walk, n_whole = row_lo // block_m, 0, 0
            if tile_list:
                n_walk = count[b * plan_m[0], h // plan_m[1], chunk]
                n_whole = full[b * plan_m[0], h // plan_m[1], chunk]
            else:
                n_walk = max(0, (row_hi + block_m - 1) // block_m - first_block)
            for walk in range(n_walk):
                block = first_block + walk
                if tile_list:
                    block = cand[b * plan_m[0], h // plan_m[1], chunk, walk]
                row0 = block * block_m
                rows = min(seqlen_q, row0 + block_m) - row0
                if interval:  # the block's candidates inside [key0, key1)
                    listed = cand[b * plan_m[0], h // plan_m[1], block,
                                  :count[b * plan_m[0], h // plan_m[1], block]]
                    lo = np.searchsorted(listed, key0)
                    n = np.searchsorted(listed, key1) - lo
                    for c in range(n):
                        keys[c] = listed[lo + c]
                else:
                    limit = _block_slots(b, h, block, block_m, False, False, causal,
                                         causal_offset, seqlen_q, seqlen_k, count, plan_m)
                    n = max(0, min(key1, limit) - key0)
                    for c in range(n):
                        keys[c] = key0 + c
                if n == 0:
                    continue
                qb, dob = q[b, h, row0:row0 + rows], do[b, h, row0:row0 + rows]
                for r in range(rows):
                    value = lse[b, h, row0 + r]
                    lse_rows[r] = np.inf if value == -np.inf else value
                for t0 in range(0, n, SUB_TILE):  # tiles of at most SUB_TILE of those keys
                    m = min(SUB_TILE, n - t0)
                    sub = keys[t0:t0 + m]
                    st = s_buf[:m * rows].reshape(m, rows)
                    th = th_buf[:m * rows].reshape(m, rows)
                    dp = dp_buf[:m * rows].reshape(m, rows)
                    view_from = -1 if interval else sub[0]  # consecutive keys: no gather
                    kt, vt = _scored_tile(
                        gemm, st, th, qb, k[b, hk], v[b, hk], sub, m, view_from, k_buf, v_buf,
                        kfirst, kend, kbv, b, h, row0, kb, kb_m, ab, ab_m, am, am_m, pad, has_pad,
                        first, end, plan_m, interval, causal, causal_offset, seqlen_q, scale,
                        softcap, walk < n_whole)
                    matmul(gemm, vt, False, dob, True, dp, False)
                    _probabilities_and_grads(st, th, lse_rows[:rows],
                                             delta[b, h, row0:row0 + rows], dp, softcap, bits)
                    part = part_buf[:m * dim].reshape(m, dim)
                    matmul(gemm, st, False, dob, False, part, False)
                    for c in range(m):
                        for d in range(dim):
                            dv_acc[sub[c] - key0, d] += part[c, d]
                    matmul(gemm, dp, False, qb, False, part, False)
                    for c in range(m):
                        for d in range(dim):
                            dk_acc[sub[c] - key0, d] += part[c, d]
                    for c in range(m):
                        column_sum = 0.0
                        for r in range(rows):
                            column_sum += th[c, r]
                        dkb_acc[sub[c] - key0] += column_sum
                    if with_dq:
                        dq_rows = dq_parts[numba.get_thread_id(), b, h, row0:row0 + rows]
                        matmul(gemm, dp, True, kt, False, dq_rows, True)
                        if need_dab:
                            for c in range(m):
                                for r in range(rows):
                                    dab[b, h, row0 + r, sub[c]] = th[c, r]
            dkb[b, h, key0:key1] = dkb_acc
        dk[b, hk, key0:key1] = dk_acc * scale
        dv[b, hk, key0:key1] = dv_acc
