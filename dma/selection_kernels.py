"""Triton kernels for the interval plan on GPUs (same result as the torch path in
selection.py, which stays the reference and the CPU path).

Inputs per plan head n: `order` (keys best first, allowed ones before the rest), `rank` (its
inverse) and `n_allowed`. One program per (query block, plan head):

* `_row_threshold_kernel` finds tau for the block's rows. The block's first row keeps the w
  best of its prefix; each later row adds one new key, so the rows' thresholds lie between
  the (w - BLOCK_M)-th and the w-th best of the first row's prefix. A 1-D scan of `order`
  finds those two ranks, then a (rows x ranks) scan of that short window finds each row's
  threshold. Work per block is about BLOCK_M x (window length), not rows x keys.
* `_candidates_kernel` lists, in ascending order, the keys kept by any row of the block:
  those with first_row < block end and end_row > block start.
"""

import triton
import triton.language as tl


@triton.jit
def _row_threshold_kernel(
    ORDER, RANK, N_ALLOWED, TAU,
    sorder_n, stau_n, seqlen_q, seqlen_k, causal_offset, window,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, WCHUNK: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    big = seqlen_k  # "keeps every allowed key"
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if CAUSAL:
        first_limit = tl.minimum(tl.maximum(block * BLOCK_M + causal_offset + 1, 0), seqlen_k)
        limits = tl.minimum(tl.maximum(rows + causal_offset + 1, 0), seqlen_k)
    else:
        first_limit = seqlen_k
        limits = tl.zeros([BLOCK_M], tl.int32) + seqlen_k
    n_allowed = tl.load(N_ALLOWED + n)
    order = ORDER + n * sorder_n
    target_lo = tl.maximum(window - BLOCK_M, 0)

    # 1-D scan: ranks where the first row's prefix count reaches target_lo and window.
    r_lo = tl.where(target_lo == 0, -1, big)
    t0 = big
    count = 0
    x0 = 0
    while (t0 == big) & (x0 < n_allowed):
        offs = x0 + tl.arange(0, CHUNK)
        idx = tl.load(order + offs, mask=offs < n_allowed, other=seqlen_k)
        active = (offs < n_allowed) & (idx < first_limit)
        running = tl.cumsum(active.to(tl.int32), 0) + count
        r_lo = tl.minimum(r_lo, tl.min(tl.where(active & (running == target_lo), offs, big), 0))
        t0 = tl.minimum(t0, tl.min(tl.where(active & (running == window), offs, big), 0))
        count += tl.sum(active.to(tl.int32), 0)
        x0 += CHUNK

    tau = tl.zeros([BLOCK_M], tl.int32) + big
    if r_lo < big:
        # Per-row count up to r_lo: target_lo old keys plus the row's new keys ranked <= r_lo.
        new_keys = first_limit + tl.arange(0, BLOCK_M)
        new_ok = new_keys < seqlen_k
        new_rank = tl.load(RANK + n * sorder_n + new_keys, mask=new_ok, other=big)
        early = new_ok & (new_rank <= r_lo) & (new_rank < n_allowed)
        seen = (new_keys[None, :] < limits[:, None]) & early[None, :]
        counts = tl.sum(seen.to(tl.int32), 1) + target_lo
        # 2-D scan of the window (r_lo, end]: rows x ranks.
        end = tl.where(t0 < big, t0, n_allowed - 1)
        x = r_lo + 1
        while x <= end:
            offs = x + tl.arange(0, WCHUNK)
            ok = offs <= end
            idx = tl.load(order + offs, mask=ok, other=seqlen_k)
            active = ok[None, :] & (idx[None, :] < limits[:, None])
            running = tl.cumsum(active.to(tl.int32), 1) + counts[:, None]
            hit = tl.min(tl.where(active & (running == window), offs[None, :], big), 1)
            tau = tl.minimum(tau, hit)
            counts += tl.sum(active.to(tl.int32), 1)
            x += WCHUNK
    tl.store(TAU + n * stau_n + rows, tau, mask=rows < seqlen_q)


@triton.jit
def _candidates_kernel(
    FIRST, END, CAND, COUNT,
    sfirst_n, scand_n, scand_blk, scount_n, seqlen_q, seqlen_k, causal_offset,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1)
    row_lo = block * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, seqlen_q)
    key_hi = seqlen_k
    if CAUSAL:
        key_hi = tl.minimum(tl.maximum(row_hi + causal_offset, 0), seqlen_k)
    out = CAND + n * scand_n + block * scand_blk
    count = 0
    for x0 in range(0, key_hi, CHUNK):
        keys = x0 + tl.arange(0, CHUNK)
        ok = keys < key_hi
        first = tl.load(FIRST + n * sfirst_n + keys, mask=ok, other=0)
        end = tl.load(END + n * sfirst_n + keys, mask=ok, other=0)
        chosen = ok & (end > first) & (first < row_hi) & (end > row_lo)
        slot = tl.cumsum(chosen.to(tl.int32), 0) - 1 + count
        tl.store(out + slot, keys, mask=chosen)
        count += tl.sum(chosen.to(tl.int32), 0)
    tl.store(COUNT + n * scount_n + block, count)
