"""Triton kernels for the interval plan on GPUs (same result as the torch path in
selection.py, which stays the reference and the CPU path).

The whole plan takes five launches (the torch path in selection.py takes about forty small
ops, whose launch overhead dominated the plan's time on GPUs):

* `_sort_keys_kernel`: per chunk of keys of a plan head, the int64 sort key of every key (the
  score's order-preserving bits above the key index; disallowed keys get the smallest value)
  and the number of allowed keys; then one torch.sort gives `order` (keys best first);
* `_ranks_kernel`: `order` as int32 and its inverse `rank`;
* `_row_threshold_kernel` and `_candidates_kernel` below, one program per (query block,
  plan head), between which `_key_intervals_kernel` turns the thresholds into each key's row
  interval [first_row, end_row).

* `_row_threshold_kernel` finds tau for the block's rows. The block's first row keeps the w
  best of its prefix; each later row adds one new key, so the rows' thresholds lie between
  the (w - BLOCK_M)-th and the w-th best of the first row's prefix. A 1-D scan of `order`
  finds those two ranks, then a (rows x ranks) scan of that short window finds each row's
  threshold. Work per block is about BLOCK_M x (window length), not rows x keys.
* `_candidates_kernel` lists, in ascending order, the keys kept by any row of the block:
  those with first_row < block end and end_row > block start.

Decoding (one query row) needs no thresholds: after the same sort, `_single_row_kernel`,
`_kept_per_chunk_kernel` and `_compact_kept_kernel` (at the end of this file) give the key
intervals and the one candidate list.
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


@triton.jit
def _sort_keys_kernel(SCORES, ALLOWED, PACKED, N_ALLOWED, sscore_n, sallowed_n, seqlen_k,
                      CHUNK: tl.constexpr):
    """One chunk of keys of one plan head; N_ALLOWED (zeroed) gathers the allowed count."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1)
    ok = keys < seqlen_k
    score = tl.load(SCORES + n * sscore_n + keys, mask=ok, other=0.0)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 sorts as 0.0, as floats compare
    allowed = ok & (tl.load(ALLOWED + n * sallowed_n + keys, mask=ok, other=0) != 0)
    bits = score.to(tl.int32, bitcast=True)
    sortable = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (sortable.to(tl.int64) << 32) | keys.to(tl.int64)
    packed = tl.where(allowed, packed, -9223372036854775808)
    tl.store(PACKED + n * seqlen_k + keys, packed, mask=ok)
    tl.atomic_add(N_ALLOWED + n, tl.sum(allowed.to(tl.int32), 0))


@triton.jit
def _ranks_kernel(ORDER, ORDER32, RANK, seqlen_k, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1)
    ok = offs < seqlen_k
    key = tl.load(ORDER + n * seqlen_k + offs, mask=ok, other=0).to(tl.int32)
    tl.store(ORDER32 + n * seqlen_k + offs, key, mask=ok)
    tl.store(RANK + n * seqlen_k + key, offs, mask=ok)


@triton.jit
def _key_intervals_kernel(RANK, TAU, ALLOWED, FIRST, END, sallowed_n, stau_n, seqlen_q,
                          seqlen_k, causal_offset, search_steps,
                          CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """Row i keeps key j iff j < limit_i and rank_j <= tau_i. tau never increases with i, so
    the rows with rank_j <= tau_i are a prefix [0, end) (a binary search); the causal limit
    gives the start, and an empty interval reads as first == end."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1)
    ok = keys < seqlen_k
    rank = tl.load(RANK + n * seqlen_k + keys, mask=ok, other=0)
    lo = tl.zeros([CHUNK], tl.int32)
    hi = tl.zeros([CHUNK], tl.int32) + seqlen_q
    for _ in range(search_steps):
        searching = lo < hi
        mid = (lo + hi) // 2
        tau = tl.load(TAU + n * stau_n + mid, mask=ok & searching, other=0)
        right = searching & (tau >= rank)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(searching & ~right, mid, hi)
    allowed = tl.load(ALLOWED + n * sallowed_n + keys, mask=ok, other=0) != 0
    end = tl.where(allowed, lo, 0)
    first = tl.zeros([CHUNK], tl.int32)
    if CAUSAL:
        first = tl.maximum(keys - causal_offset, 0)
    end = tl.maximum(end, first)
    tl.store(FIRST + n * seqlen_k + keys, first, mask=ok)
    tl.store(END + n * seqlen_k + keys, end, mask=ok)


@triton.jit
def _single_row_kernel(SORTED, ORDER, N_ALLOWED, FIRST, END, COUNT, seqlen_k, window,
                       CHUNK: tl.constexpr):
    """Decoding plan (one query row), step 1 of 3, over positions of the best-first order:
    the first `window` allowed keys are kept, with the row interval [0, 1); the rest get
    [0, 0). Every key sits at one position, so every entry is written once."""
    chunk = tl.program_id(0)
    n = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = offs < seqlen_k
    key = tl.load(ORDER + n * seqlen_k + offs, mask=ok, other=0)
    value = tl.load(SORTED + n * seqlen_k + offs, mask=ok, other=-9223372036854775808)
    kept = (offs < window) & (value != -9223372036854775808)
    tl.store(FIRST + n * seqlen_k + key, tl.zeros([CHUNK], tl.int32), mask=ok)
    tl.store(END + n * seqlen_k + key, kept.to(tl.int32), mask=ok)
    if chunk == 0:
        tl.store(COUNT + n, tl.minimum(tl.load(N_ALLOWED + n), window))


@triton.jit
def _kept_per_chunk_kernel(END, CHUNK_KEPT, seqlen_k, n_chunks, CHUNK: tl.constexpr):
    """Step 2: how many keys of each chunk of keys the row keeps."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1)
    kept = tl.load(END + n * seqlen_k + keys, mask=keys < seqlen_k, other=0)
    tl.store(CHUNK_KEPT + n * n_chunks + tl.program_id(0), tl.sum(kept, 0))


@triton.jit
def _compact_kept_kernel(END, CHUNK_KEPT, CAND, seqlen_k, n_chunks, width, scand_n,
                         CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    """Step 3: the candidate list, ascending: a key's slot is the number of kept keys before
    it (earlier chunks' counts plus a scan of its own chunk). Slots from the total up to
    `width` read -1, each written by the program whose chunk range holds it."""
    chunk = tl.program_id(0)
    n = tl.program_id(1)
    others = tl.arange(0, CHUNKS_PAD)
    counts = tl.load(CHUNK_KEPT + n * n_chunks + others, mask=others < n_chunks, other=0)
    before = tl.sum(tl.where(others < chunk, counts, 0), 0)
    total = tl.sum(counts, 0)
    keys = chunk * CHUNK + tl.arange(0, CHUNK)
    kept = tl.load(END + n * seqlen_k + keys, mask=keys < seqlen_k, other=0) != 0
    slot = before + tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(CAND + n * scand_n + slot, keys, mask=kept)
    pad = keys  # this program's share of the slots
    tl.store(CAND + n * scand_n + pad, tl.full([CHUNK], -1, tl.int32),
             mask=(pad >= total) & (pad < width))
