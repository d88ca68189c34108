"""The selection plan: which keys each query row keeps (SPEC section 3), in one place.

Backend-neutral torch code that runs on CPU and CUDA.

* `build_interval_plan` serves the DMA case (key_bias ranks keys; masks are causal, key padding
  or per-key only). Each row keeps the `window` best allowed keys by (key_bias_j, j). The w-th
  best pair tau_i never gets worse as the row index grows, so every key is kept by one
  interval of rows [first_row_j, end_row_j). The plan stores those two numbers per key (O(Sk)
  per head) and, for every block of `block_m` query rows, the list of keys that any of its rows
  keeps: at most window + block_m keys (the block's first row keeps `window`, each later row
  adds at most one new key). No Sq x Sk tensor is ever built.
* `rowwise_keep` serves the general case (window together with attn_bias or a row-varying
  attn_mask): a dense top-w per row over a range of rows, O(rows x Sk).

Selection scores are compared in float32 and carry no gradient; ties go to the later key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import plan_graphs
from .layout import expand_heads, to_query_heads
from .packages import installed
from .triton_launch import next_pow2, run_kernel
from .validation import SELECT_ROWWISE, Inputs, Problem

PLAN_CHUNK = 1024  # keys per step of every plan kernel except the thresholds
# The row-threshold kernel's rows per program and keys per scan step (its coarse count takes
# 4 x that). On an H200 (B1, 8 plan heads, window 2048, us per call): 32 rows and 512 keys
# took 52.6 at 16k tokens and 436 at 128k, against 65.5 and 485 for the plan's 64-row blocks
# and 1024 keys; 128 rows took 93 and 701; 1, 2 or 8 warps were slower.
THRESHOLD_ROWS = 32
THRESHOLD_CHUNK = 512
# How the triton plan sorts each row of keys best first (`triton_sort`): up to
# SORT_IN_ONE_PROGRAM keys in one program per row (_sort_row_kernel); up to SORT_BY_MERGING
# keys in SORT_MERGE_CHUNKS chunks, one program each, then merged by rank
# (_merge_ranks_kernel); longer rows by torch's segmented sort. Either kernel path is one or
# two launches where torch's sort and its helper ops take about a dozen, whose host time
# exceeds their GPU time. Sort, ranks, thresholds and intervals, 8 plan heads, bfloat16
# scores, GPU / host us per call (`bench_plan.py --sorts`): on an H200 at 4096 keys 32.6
# merged from 8 chunks, 80.1 in one program, 40.8 through torch; on an H100 at 8192 keys
# 48.6 / 108 merged against 78.0 / 224 through torch, at 16384 96.9 / 122 against
# 108.3 / 243 (the 16k forward from idle 2.37 -> 2.25 ms, back to back 1.76 -> 1.72).
# One program per row is slow past 512 keys (4096 keys in one program took 61 us).
# Longer rows than 16384 keys are unmeasured for the merge (its chunks' one-program sorts
# grow with them) and keep torch's sort.
SORT_IN_ONE_PROGRAM = 512
SORT_BY_MERGING = 16384
SORT_MERGE_CHUNKS = 8
MERGE_SEARCHES = 1024  # (entry, other chunk) searches per program of _merge_ranks_kernel
TRITON_SORTS = ("one program", "merged chunks", "torch sort")


def plan_layout(problem: Problem) -> tuple[int, int]:
    """(batch, heads) of the interval plan: the finest of key_bias, per-key mask and padding."""
    batch = 1
    heads = 1
    for bc in (problem.key_bias, problem.attn_mask):
        if bc is not None:
            batch = max(batch, bc.batch)
            heads = max(heads, bc.heads)
    if problem.key_padding:
        batch = problem.batch
    return batch, heads


def has_key_masks(inputs: Inputs) -> bool:
    """Whether a row-independent mask (padding, per-key attn_mask) removes keys at all."""
    return inputs.key_padding_mask is not None or inputs.attn_mask is not None


def allowed_keys(problem: Problem, inputs: Inputs, batch: int, heads: int) -> torch.Tensor:
    """(batch, heads, Sk) bool: keys that no row-independent mask removes."""
    allowed = torch.ones(batch, heads, problem.seqlen_k, dtype=torch.bool, device=problem.device)
    if inputs.key_padding_mask is not None:
        allowed = allowed & inputs.key_padding_mask[:, None, :]
    if inputs.attn_mask is not None:
        mask = inputs.attn_mask[:, :, 0, :]  # rows == 1 in the interval case
        mask = expand_heads(mask, heads, problem.heads)
        allowed = allowed & mask
    return allowed


def key_selection_scores(problem: Problem, inputs: Inputs, batch: int, heads: int):
    """(batch, heads, Sk) key_bias, detached, in its own dtype (zeros when absent); selection
    compares it as float32 (`sortable_int32`, the plan kernels)."""
    shape = (batch, heads, problem.seqlen_k)
    if inputs.key_bias is None:
        return torch.zeros(shape, dtype=torch.float32, device=problem.device)
    kb = expand_heads(inputs.key_bias.detach(), heads, problem.heads)
    return kb.expand(shape)


@dataclass(frozen=True)
class IntervalPlan:
    """Kept pairs of the DMA case. Query head h reads plan head h // (H // heads)."""

    block_m: int
    batch: int  # 1 or B
    heads: int  # 1, Hkv or H
    key_first_row: torch.Tensor  # (batch, heads, Sk) int32: first row that keeps key j
    key_end_row: torch.Tensor  # (batch, heads, Sk) int32: rows [first, end) keep key j
    # (batch, heads, n_blocks, max_candidates) int32, -1 pad: the keys any row of the block
    # keeps, ascending; with `full_first`, the keys every row of the block keeps come first,
    # then the others, each part in no set order (the triton engine may list a block's
    # kept keys best first; the gathering kernels need no order).
    candidates: torch.Tensor
    candidate_count: torch.Tensor  # (batch, heads, n_blocks) int32
    # (batch, heads, n_blocks) int32: the block's first full_count candidates are kept by all
    # of its rows, so kernels can skip their per-pair test: 0 without `full_first`, except for
    # one query row, whose candidates all are. Same strides as candidate_count.
    full_count: torch.Tensor


def sortable_int32(x: torch.Tensor) -> torch.Tensor:
    """Map float32 to int32 so that integer order is float order (-0.0 and 0.0 compare equal,
    as floats do; NaN is outside the contract)."""
    bits = (x.float() + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def best_first_order(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Key indices along the last dim, best first: allowed keys by (score, index) descending
    (later keys win ties), then every disallowed key, whatever its score.

    One sort of packed int64 keys: the score's order-preserving bits above the key index.
    """
    index = torch.arange(scores.shape[-1], device=scores.device)
    packed = (sortable_int32(scores).to(torch.int64) << 32) | index
    packed = packed.masked_fill(~allowed, torch.iinfo(torch.int64).min)
    return torch.sort(packed, dim=-1, descending=True).indices


def _prefix_kth_smallest(values: torch.Tensor, prefix_len: torch.Tensor, k: int) -> torch.Tensor:
    """k-th smallest (0-based) of values[r, :prefix_len[r, t]] for every query t.

    `values` (N, S) holds a permutation of 0..S-1 in every row. A wavelet matrix answers
    every query in one pass over the bits of S: O(S log S) to build, O(log S) per query,
    with a loop over bit levels only. Queries with prefix_len <= k return garbage (callers
    mask them).
    """
    n, s = values.shape
    device = values.device
    levels = max(1, (s - 1).bit_length())
    position = torch.arange(s, device=device)
    zeros_before = []  # per level: (N, S+1) count of 0-bits before each position
    cur = values
    for level in reversed(range(levels)):
        bit = (cur >> level) & 1
        zb = torch.zeros(n, s + 1, dtype=torch.int64, device=device)
        torch.cumsum(1 - bit, dim=-1, out=zb[:, 1:])
        zeros_before.append(zb)
        total_zeros = zb[:, -1:]
        # Stable partition: 0-bits first, then 1-bits.
        dest = torch.where(bit == 0, zb[:, :-1], total_zeros + position - zb[:, :-1])
        cur = torch.empty_like(cur).scatter_(-1, dest, cur)

    start = torch.zeros_like(prefix_len)
    end = prefix_len.clone()
    rank = torch.full_like(prefix_len, k)
    result = torch.zeros_like(prefix_len)
    for zb, level in zip(zeros_before, reversed(range(levels))):
        total_zeros = zb[:, -1:]
        z_start = zb.gather(-1, start)
        z_end = zb.gather(-1, end)
        zeros_in_range = z_end - z_start
        go_ones = rank >= zeros_in_range
        result |= go_ones.to(result.dtype) << level
        rank = torch.where(go_ones, rank - zeros_in_range, rank)
        start = torch.where(go_ones, total_zeros + start - z_start, z_start)
        end = torch.where(go_ones, total_zeros + end - z_end, z_end)
    return result


def row_key_limit(problem: Problem, device) -> torch.Tensor:
    """(Sq,) int64: the number of leading keys row i may see before masks (causal prefix)."""
    rows = torch.arange(problem.seqlen_q, device=device)
    if not problem.causal:
        return torch.full_like(rows, problem.seqlen_k)
    return (rows + problem.causal_offset + 1).clamp(0, problem.seqlen_k)


def plan_engine(device: torch.device) -> str:
    """Who computes thresholds and candidate lists: "triton" (CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1), "numba" (CPU tensors when numba is installed) or "torch" (anywhere).
    DMA_PLAN=torch|numba|triton forces one."""
    forced = os.environ.get("DMA_PLAN")
    if forced:
        return forced
    if installed("triton") and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "triton"
    if device.type == "cpu" and installed("numba"):
        return "numba"
    return "torch"


def build_interval_plan(problem: Problem, inputs: Inputs, block_m: int,
                        engine: Optional[str] = None, full_first: bool = False) -> IntervalPlan:
    """The plan for blocks of `block_m` rows; `full_first` orders each block's candidates
    with the keys that all its rows keep first (IntervalPlan.full_count)."""
    sk = problem.seqlen_k
    batch, heads = plan_layout(problem)
    engine = engine or plan_engine(problem.device)
    # The triton kernels take "every key allowed" as a flag rather than a tensor of ones.
    allowed = None
    if engine != "triton" or has_key_masks(inputs):
        allowed = allowed_keys(problem, inputs, batch, heads).reshape(batch * heads, sk)
        allowed = allowed.contiguous()
    scores = key_selection_scores(problem, inputs, batch, heads).reshape(batch * heads, sk)
    tensors = None
    if engine == "triton" and plan_graphs.graphs_enabled(problem.device) and (
            problem.seqlen_q == 1 or triton_sort(sk) != "torch sort"):
        tensors = plan_graphs.replay_or_capture(
            _plan_graph_key(problem, scores, allowed, block_m, full_first), (scores, allowed),
            lambda s, a: plan_tensors(problem, s, a, block_m, engine, full_first))
    if tensors is None:
        tensors = plan_tensors(problem, scores.contiguous(), allowed, block_m, engine,
                               full_first)
    first_row, end_row, candidates, counts, full = tensors
    n_blocks = candidates.shape[1]
    return IntervalPlan(
        block_m=block_m,
        batch=batch,
        heads=heads,
        key_first_row=first_row.reshape(batch, heads, sk),
        key_end_row=end_row.reshape(batch, heads, sk),
        candidates=candidates.reshape(batch, heads, n_blocks, -1),
        candidate_count=counts.reshape(batch, heads, n_blocks),
        full_count=full.reshape(batch, heads, n_blocks),
    )


def _plan_graph_key(problem: Problem, scores, allowed, block_m: int, full_first: bool):
    """What a triton plan depends on besides the values of its scores and allowed keys
    (plan_graphs.py); the tuning constants too, which tests change."""
    return (scores.device, tuple(scores.shape), scores.dtype, allowed is None,
            problem.seqlen_q, problem.seqlen_k, problem.causal, problem.causal_offset,
            problem.window, block_m, full_first, PLAN_CHUNK, THRESHOLD_ROWS,
            THRESHOLD_CHUNK, SORT_IN_ONE_PROGRAM, SORT_BY_MERGING, SORT_MERGE_CHUNKS,
            MERGE_SEARCHES, CANDIDATE_PROGRAM_BLOCKS, RANKED_PROGRAM_BLOCKS)


def plan_tensors(problem: Problem, scores, allowed, block_m: int, engine: str,
                 full_first: bool):
    """The plan's tensors from (n, Sk) selection scores and allowed keys (None: every key):
    (first_row, end_row) int32 (n, Sk), then candidates (n, n_blocks, width), their counts
    and full counts (n, n_blocks). Reads nothing else of the inputs, so that a CUDA graph
    can replay it on new scores (plan_graphs.py)."""
    if problem.seqlen_q == 1:
        first_row, end_row, candidates, counts = _single_row_plan(problem, scores, allowed,
                                                                  block_m, engine)
        return first_row, end_row, candidates, counts, counts  # one row keeps them all
    if engine == "triton":
        first_row, end_row, candidates, counts = _triton_plan_outputs(problem, scores,
                                                                      block_m, count_parts=2)
        _, _, *ranking = _key_intervals_triton(problem, scores, allowed,
                                               out=(first_row, end_row))
        candidates, counts, full = _candidate_lists_triton(
            problem, first_row, end_row, block_m, full_first, ranking, out=(candidates, counts))
    else:
        first_row, end_row = _key_intervals(problem, scores, allowed, engine)
        candidates, counts, full = _candidate_lists_by(engine, problem, first_row, end_row,
                                                       block_m, full_first)
    return first_row, end_row, candidates, counts, full


def _triton_plan_outputs(problem: Problem, scores, block_m: int, count_parts: int):
    """A triton plan's outputs carved from one int32 buffer: first_row and end_row (n, Sk),
    candidates (n, n_blocks, width) and counts (n, count_parts, n_blocks). One allocation,
    and a CUDA graph of the plan hands its outputs out with one copy (plan_graphs.py)."""
    n, sk = scores.shape
    n_blocks = max(1, -(-problem.seqlen_q // block_m))
    width = min(sk, problem.window + block_m)
    sizes = [n * sk, n * sk, n * n_blocks * width, n * count_parts * n_blocks]
    packed = torch.empty(sum(sizes), dtype=torch.int32, device=scores.device)
    first_row, end_row, candidates, counts = packed.split(sizes)
    return (first_row.view(n, sk), end_row.view(n, sk), candidates.view(n, n_blocks, width),
            counts.view(n, count_parts, n_blocks))


def _single_row_plan(problem: Problem, scores, allowed, block_m: int, engine: str):
    """Decoding (one query row): the row keeps the first min(w, allowed) keys of the
    best-first order: one sort on the torch path, a radix select of the w-th best on the
    triton one; no thresholds, no interval search, and the candidate list is a parallel
    compaction rather than one program's scan over all keys.
    Kept keys get the row interval [0, 1), the others [0, 0), as the general path gives for
    Sq == 1 (the row sees every key)."""
    n, sk = scores.shape
    device = scores.device
    w = min(problem.window, sk)
    width = min(sk, problem.window + block_m)
    if engine == "triton":
        first_row, end_row, candidates, counts = _triton_plan_outputs(problem, scores, block_m,
                                                                      count_parts=1)
        _single_row_plan_triton(scores, allowed, w, width,
                                out=(first_row, end_row, candidates, counts))
        return first_row, end_row, candidates, counts.view(n, 1)
    order, n_allowed = best_first_order(scores, allowed), allowed.sum(-1)
    top = order[:, :w]
    kept = torch.arange(w, device=device) < n_allowed[:, None]
    end_row = torch.zeros(n, sk, dtype=torch.int32, device=device)
    end_row.scatter_(1, top, kept.to(torch.int32))
    listed = torch.where(kept, top, sk).sort(dim=-1).values  # kept keys ascending, then sk
    candidates = torch.full((n, 1, width), -1, dtype=torch.int32, device=device)
    candidates[:, 0, :w] = torch.where(listed < sk, listed, -1)
    counts = kept.sum(-1, dtype=torch.int32).reshape(n, 1)
    return torch.zeros_like(end_row), end_row, candidates, counts


def _single_row_plan_triton(scores, allowed, window: int, width: int, out):
    """The decoding plan without a sort: a radix select of the window-th best score in three
    histogram launches (two for 16-bit scores), then per chunk the kept counts and the plan
    (selection_kernels.py), into `out`: first_row, end_row (n, Sk), candidates (n, 1, width)
    and counts (n, 1, 1)."""
    from . import selection_kernels as kern

    n, sk = scores.shape
    device = scores.device
    n_chunks = -(-sk // PLAN_CHUNK)
    hist = torch.zeros(n, 3 * kern.BINS.value + 1, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(n, n_chunks, 2, dtype=torch.int32, device=device)
    first_row, end_row, candidates, counts = out
    grid = (n_chunks, n)
    keys = (scores, scores.stride(0), *_allowed_args(allowed, scores), hist, hist.stride(0))
    # 16-bit scores are told apart by their first two digits (selection_kernels.py)
    levels = 2 if scores.element_size() == 2 else 3
    for level in range(levels):
        run_kernel(kern._decode_histogram_kernel, grid, *keys, sk, window, LEVEL=level,
                   CHUNK=PLAN_CHUNK)
    run_kernel(kern._decode_chunk_counts_kernel, grid, *keys, chunk_counts, n_chunks, sk,
               window, CHUNK=PLAN_CHUNK, LEVELS=levels)
    run_kernel(kern._decode_plan_kernel, grid, *keys, chunk_counts, first_row, end_row,
               candidates, counts, candidates.stride(0), n_chunks, sk, window, width,
               CHUNK=PLAN_CHUNK, CHUNKS_PAD=next_pow2(n_chunks),
               LEVELS=levels)


def _key_intervals(problem: Problem, scores, allowed, engine: str):
    """(first_row, end_row), int32 (n, Sk): the rows [first, end) that keep each key."""
    sk = problem.seqlen_k
    device = scores.device
    n = scores.shape[0]
    order = best_first_order(scores, allowed)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(sk, device=device).expand_as(order))

    # tau_i: rank of the w-th best allowed key in row i's prefix; rows with at most w allowed
    # keys keep all of them (tau = Sk, worse than every rank).
    if engine == "numba":
        tau = _row_thresholds_numba(problem, ranks, allowed)
    else:
        tau = _row_thresholds_torch(problem, ranks, allowed)

    # Row i keeps key j iff j < limit_i and rank_j <= tau_i. tau never increases with i, so the
    # rows with rank_j <= tau_i are a prefix [0, end); the causal limit gives the start.
    end_row = torch.searchsorted(-tau, -ranks, right=True)
    end_row = torch.where(allowed, end_row, torch.zeros_like(end_row))
    keys = torch.arange(sk, device=device)
    if problem.causal:
        first_row = (keys - problem.causal_offset).clamp(min=0).expand(n, sk)
    else:
        first_row = torch.zeros_like(end_row)
    end_row = torch.maximum(end_row, first_row)  # an empty interval reads as first == end
    return first_row.to(torch.int32).contiguous(), end_row.to(torch.int32).contiguous()


def _allowed_args(allowed, stand_in) -> tuple:
    """(ALLOWED, its row stride, HAS_ALLOWED) for the plan kernels; None: every key allowed."""
    if allowed is None:
        return stand_in, 0, False
    return allowed, allowed.stride(0), True


def _sorted_keys_triton(scores, allowed):
    """The sort positions of `best_first_order` (Sk - 1 - key, best first) and the allowed
    count per row: one kernel and one sort of int32 keys (half the passes of the int64
    score-and-index keys that `best_first_order` sorts), of int16 keys for bfloat16 scores
    (half again)."""
    from . import selection_kernels as kern

    n, sk = scores.shape
    short_keys = scores.dtype == torch.bfloat16
    sort_keys = torch.empty(n, sk, dtype=torch.int16 if short_keys else torch.int32,
                            device=scores.device)
    n_allowed = torch.zeros(n, dtype=torch.int32, device=scores.device)
    run_kernel(kern._sort_keys_kernel, (-(-sk // PLAN_CHUNK), n), scores, *_allowed_args(allowed,
               scores), sort_keys, n_allowed, scores.stride(0), sk, CHUNK=PLAN_CHUNK,
               SHORT_KEYS=short_keys)
    positions = torch.sort(sort_keys, dim=-1, descending=True, stable=True).indices
    return positions, n_allowed


def triton_sort(seqlen_k: int) -> str:
    """Which of TRITON_SORTS the triton plan takes for rows of `seqlen_k` keys."""
    if seqlen_k <= SORT_IN_ONE_PROGRAM:
        return "one program"
    return "merged chunks" if seqlen_k <= SORT_BY_MERGING else "torch sort"


def _sort_warps(row: int) -> int:
    return 8 if row <= 4096 else 16  # at most 32 keys per thread


def _merged_chunk_sort_triton(scores, allowed, order32, ranks):
    """Rows sorted in SORT_MERGE_CHUNKS chunks or fewer, one program each, then every key's
    place in its row from its place in its chunk and a binary search in each other chunk
    (selection_kernels.py): writes `order32` and `ranks` as `_ranks_kernel` does; returns
    the allowed count per row. O(Sk) extra memory per plan head."""
    from . import selection_kernels as kern

    n, sk = scores.shape
    device = scores.device
    row = max(16, next_pow2(-(-sk // SORT_MERGE_CHUNKS)))
    n_chunks = -(-sk // row)
    sorted_chunks = torch.empty(n, n_chunks * row, dtype=torch.int64, device=device)
    chunk_allowed = torch.empty(n, n_chunks, dtype=torch.int32, device=device)
    n_allowed = torch.empty(n, dtype=torch.int32, device=device)
    run_kernel(kern._sort_chunk_kernel, (n_chunks, n), scores, *_allowed_args(allowed, scores),
               sorted_chunks, chunk_allowed, scores.stride(0), sk, n_chunks, ROW=row,
               num_warps=_sort_warps(row))
    chunks_pad = max(2, next_pow2(n_chunks))
    block = min(row, max(16, MERGE_SEARCHES // chunks_pad))
    run_kernel(kern._merge_ranks_kernel, (n_chunks * row // block, n), sorted_chunks,
               chunk_allowed, order32, ranks, n_allowed, sk, n_chunks, ROW=row, BLOCK=block,
               SEARCH_STEPS=row.bit_length(), CHUNKS_PAD=chunks_pad)
    return n_allowed


def _key_intervals_triton(problem: Problem, scores, allowed, sort: Optional[str] = None,
                          out: Optional[tuple] = None):
    """The same intervals in five launches or so (selection_kernels.py), and what the
    candidate lists can scan instead of every earlier key: (first_row, end_row, order, tau,
    n_allowed), int32: the keys best first (allowed ones first), each row's threshold as a
    position in that order (Sk: the row keeps every allowed key it sees), the allowed count.
    `sort`: one of TRITON_SORTS (default `triton_sort(Sk)`); all give the same result.
    `out`: (first_row, end_row) to write, contiguous (n, Sk) int32."""
    from . import selection_kernels as kern

    n, sk = scores.shape
    device = scores.device
    chunk = PLAN_CHUNK
    order32 = torch.empty(n, sk, dtype=torch.int32, device=device)
    ranks = torch.empty(n, sk, dtype=torch.int32, device=device)
    sort = sort or triton_sort(sk)
    if sort == "one program":
        row = max(16, next_pow2(sk))
        n_allowed = torch.empty(n, dtype=torch.int32, device=device)
        run_kernel(kern._sort_row_kernel, (n,), scores, *_allowed_args(allowed, scores),
                   order32, ranks, n_allowed, scores.stride(0), sk, ROW=row,
                   num_warps=_sort_warps(row))
    elif sort == "merged chunks":
        n_allowed = _merged_chunk_sort_triton(scores, allowed, order32, ranks)
    else:
        positions, n_allowed = _sorted_keys_triton(scores, allowed)
        run_kernel(kern._ranks_kernel, (-(-sk // chunk), n), positions, order32, ranks, sk,
                   CHUNK=chunk)
    # Thresholds are per row: their blocks need not be the plan's. THRESHOLD_ROWS rows and
    # THRESHOLD_CHUNK keys per scan step are the fastest measured (see the constants).
    rows = THRESHOLD_ROWS
    n_blocks = -(-problem.seqlen_q // rows)
    tau = torch.empty(n, problem.seqlen_q, dtype=torch.int32, device=device)
    # Per block, room for 2 x rows (rank, tag) events (int64): O(Sq) per plan head.
    events = torch.empty(n, n_blocks * 2 * rows, dtype=torch.int64, device=device)
    run_kernel(kern._row_threshold_kernel, (n_blocks, n),
        order32, ranks, n_allowed, tau, events, order32.stride(0), tau.stride(0),
        events.stride(0), problem.seqlen_q, sk, problem.causal_offset, problem.window,
        CAUSAL=problem.causal, BLOCK_M=rows, CHUNK=THRESHOLD_CHUNK,
        SCAN_CHUNK=4 * THRESHOLD_CHUNK, ECHUNK=min(32, 2 * rows),
    )
    if out is None:
        out = (torch.empty(n, sk, dtype=torch.int32, device=device),
               torch.empty(n, sk, dtype=torch.int32, device=device))
    first_row, end_row = out
    run_kernel(kern._key_intervals_kernel, (-(-sk // chunk), n),
        ranks, tau, *_allowed_args(allowed, ranks), first_row, end_row, tau.stride(0),
        problem.seqlen_q, sk, problem.causal_offset, problem.seqlen_q.bit_length() + 1,
        CAUSAL=problem.causal, CHUNK=chunk,
    )
    return first_row, end_row, order32, tau, n_allowed


def coarse_candidate_lists(problem: Problem, plan: IntervalPlan, block_m: int):
    """Candidate lists of the plan's kept pairs for blocks of `block_m` rows (any size), as
    (batch, heads, n_blocks, min(Sk, window + block_m)) and counts."""
    n = plan.batch * plan.heads
    first = plan.key_first_row.reshape(n, -1)
    end = plan.key_end_row.reshape(n, -1)
    candidates, counts, _ = _candidate_lists_by(plan_engine(problem.device), problem, first,
                                                end, block_m)
    n_blocks = candidates.shape[1]
    return (candidates.reshape(plan.batch, plan.heads, n_blocks, -1),
            counts.reshape(plan.batch, plan.heads, n_blocks))


def _row_thresholds_torch(problem: Problem, ranks, allowed):
    n, sk = ranks.shape
    limit = row_key_limit(problem, ranks.device).expand(n, problem.seqlen_q).contiguous()
    allowed_before = torch.zeros(n, sk + 1, dtype=torch.int64, device=ranks.device)
    torch.cumsum(allowed, dim=-1, out=allowed_before[:, 1:])
    allowed_in_prefix = allowed_before.gather(-1, limit)
    tau = _prefix_kth_smallest(ranks, limit, problem.window - 1)
    return torch.where(allowed_in_prefix > problem.window, tau, torch.full_like(tau, sk))


def _candidate_lists_by(engine: str, problem: Problem, first_row, end_row, block_m: int,
                        full_first: bool = False):
    """(candidates, counts, full counts) of blocks of `block_m` rows from int32 (n, Sk)
    intervals (see IntervalPlan.candidates)."""
    if engine == "triton":
        return _candidate_lists_triton(problem, first_row, end_row, block_m, full_first)
    if engine == "numba":
        from .selection_numba import candidate_lists

        n, sk = first_row.shape
        n_blocks = max(1, -(-problem.seqlen_q // block_m))
        width = min(sk, problem.window + block_m)
        candidates = torch.empty(n, n_blocks, width, dtype=torch.int32)
        counts = torch.empty(n, n_blocks, dtype=torch.int32)
        full = torch.empty(n, n_blocks, dtype=torch.int32)
        candidate_lists(first_row.contiguous().numpy(), end_row.contiguous().numpy(),
                        problem.seqlen_q, block_m, full_first, candidates.numpy(),
                        counts.numpy(), full.numpy())
        return candidates, counts, full
    return _candidate_lists(first_row.long(), end_row.long(), problem.seqlen_q, block_m,
                            problem.window, full_first)


def _row_thresholds_numba(problem: Problem, ranks, allowed):
    from .selection_numba import row_thresholds

    n = ranks.shape[0]
    limit = row_key_limit(problem, ranks.device)
    tau = torch.empty(n, problem.seqlen_q, dtype=torch.int64)
    row_thresholds(ranks.contiguous().numpy(), allowed.contiguous().numpy(), limit.numpy(),
                   problem.window, tau.numpy())
    return tau


def _candidate_lists_triton(problem: Problem, first_row, end_row, block_m: int,
                            full_first: bool, ranking=None, out: Optional[tuple] = None):
    """(candidates, counts, full counts); `out`: the candidates (n, n_blocks, width) and
    counts (n, 2, n_blocks) to write (_triton_plan_outputs)."""
    from .selection_kernels import _candidates_kernel

    # first_row is every key's causal start (as all engines write it): the kernel derives it
    # and reads end rows only. With a ranking, a program's first block may find its first
    # row's kept keys best first (fewer keys to scan for late blocks), which gives up the
    # ascending order: only for full-first lists, whose order within each part is free.
    rank_scan = full_first and ranking is not None
    # Without the rank scan the kernel never reads these: any int32 tensors stand in.
    order, tau, n_allowed = ranking if rank_scan else (end_row, end_row, end_row)
    n, sk = first_row.shape
    device = first_row.device
    n_blocks = max(1, -(-problem.seqlen_q // block_m))
    width = min(sk, problem.window + block_m)
    per_program = candidate_blocks_per_program(n_blocks, block_m, problem.window,
                                               problem.seqlen_q, rank_scan)
    n_programs = -(-n_blocks // per_program)
    if out is None:
        out = (torch.empty(n, n_blocks, width, dtype=torch.int32, device=device),
               torch.empty(n, 2, n_blocks, dtype=torch.int32, device=device))
    candidates, counts = out
    # Each program's two lists of listed keys (one when it serves one block): at most the
    # size of the candidate lists themselves.
    listed = torch.empty(n, n_programs, min(per_program, 2), width, dtype=torch.int32,
                         device=device)
    run_kernel(_candidates_kernel, (n_programs, n),
        end_row, order, tau, n_allowed, candidates, counts[:, 0], counts[:, 1], listed,
        end_row.stride(0), order.stride(0), tau.stride(0), candidates.stride(0),
        candidates.stride(1), counts.stride(0), listed.stride(0), listed.stride(1), n_blocks,
        per_program, problem.seqlen_q, sk, problem.causal_offset, width, CAUSAL=problem.causal,
        BLOCK_M=block_m, CHUNK=PLAN_CHUNK, FULL_FIRST=full_first, RANK_SCAN=rank_scan,
    )
    return candidates, counts[:, 0], counts[:, 1]


CANDIDATE_PROGRAM_BLOCKS = 32  # most blocks one candidate-list program serves
RANKED_PROGRAM_BLOCKS = 4  # blocks per program when the first block scans by rank


def candidate_blocks_per_program(n_blocks: int, block_m: int, window: int, seqlen_q: int,
                                 rank_scan: bool = False) -> int:
    """Consecutive blocks per program of `_candidates_kernel`. One for short sequences in
    small blocks: there the full scans are short and a program per block fills the GPU.
    Otherwise about window / block_m (4 to CANDIDATE_PROGRAM_BLOCKS): the full scan of every
    earlier key (blocks x keys in all) gives way to derived lists. Measured on an H200 (B1,
    8 plan heads, window 2048, one run, us per call for 4 / 8 / 16 / 32 / 64 blocks per
    program): 64-row blocks at 128k tokens 1244 / 924 / 823 / 734 / 942; 128-row blocks at
    128k 669 / 529 / 450 / 538 / 765; 1024-row blocks at 128k 221 / 233 / 300 / 424 / 670, at
    16k 85 / 84; at 16k tokens one block per program (128-row blocks: 4 was 12% slower).
    A first block that scans by rank (`rank_scan`) reads about window x Sk / prefix keys,
    not its whole prefix, so shorter chains win: at 128k, us per call for 4 / 8 / 16 / 32
    blocks, 64-row blocks 541 / 542 / 584 / 571, 128-row blocks 328 / 344 / 331 / - (the
    earlier settings with the key scan: 769 and 540)."""
    if seqlen_q < 32 * window and block_m < window // 4:
        return 1
    if rank_scan:
        per_program = RANKED_PROGRAM_BLOCKS
    else:
        per_program = max(4, min(CANDIDATE_PROGRAM_BLOCKS, window // block_m))
    return min(per_program, max(1, n_blocks // 2))


def _candidate_lists(first_row, end_row, seqlen_q: int, block_m: int, window: int,
                     full_first: bool):
    """Per block of rows, the ascending list of keys kept by any of its rows (with
    `full_first`, those kept by all its rows first), its length and the full count.

    Key j joins blocks first_row_j // block_m .. (end_row_j - 1) // block_m. The lists are
    built by expanding every key into its blocks and sorting the entries by block; no row x
    key tensor is involved.
    """
    n, sk = first_row.shape
    device = first_row.device
    n_blocks = max(1, -(-seqlen_q // block_m))
    width = min(sk, window + block_m)
    kept = end_row > first_row
    first_block = torch.div(first_row, block_m, rounding_mode="floor")
    last_block = torch.div(end_row - 1, block_m, rounding_mode="floor")
    blocks_per_key = torch.where(kept, last_block - first_block + 1, torch.zeros_like(first_row))
    flat_counts = blocks_per_key.reshape(-1)
    total = int(flat_counts.sum())  # the one host sync of the plan: sizes the entry list
    repeat = dict(repeats=flat_counts, output_size=total)
    entry_key = torch.repeat_interleave(torch.arange(n * sk, device=device), **repeat)
    entry_start = torch.cumsum(flat_counts, 0) - flat_counts
    entry_block = (
        torch.arange(total, device=device)
        - torch.repeat_interleave(entry_start, **repeat)
        + torch.repeat_interleave(first_block.reshape(-1), **repeat)
    )
    head = torch.div(entry_key, sk, rounding_mode="floor")
    bucket = head * n_blocks + entry_block  # (plan head, block)
    full = torch.zeros_like(bucket, dtype=torch.bool)
    if full_first:  # kept from the block's first row to its last
        block_end = ((entry_block + 1) * block_m).clamp(max=seqlen_q)
        full = ((first_row.reshape(-1)[entry_key] <= entry_block * block_m)
                & (end_row.reshape(-1)[entry_key] >= block_end))
    # Entries are in (head, key) order; a stable sort by bucket (full entries first) keeps
    # keys ascending within each part.
    _, order = torch.sort(bucket * 2 + (~full).long(), stable=True)
    bucket, full = bucket[order], full[order]
    entry_key = entry_key[order] - head[order] * sk
    full_counts = torch.bincount(bucket[full], minlength=n * n_blocks)
    counts = torch.bincount(bucket, minlength=n * n_blocks)
    bucket_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(total, device=device) - bucket_start[bucket]
    candidates = torch.full((n * n_blocks, width), -1, dtype=torch.int32, device=device)
    candidates[bucket, slot] = entry_key.to(torch.int32)
    return (candidates.reshape(n, n_blocks, width), counts.to(torch.int32).reshape(n, n_blocks),
            full_counts.to(torch.int32).reshape(n, n_blocks))


def rows_and_keys(t: torch.Tensor, rows: slice, key_count: int) -> torch.Tensor:
    """Slice a (b, h, Sq or 1, Sk or 1) bias or mask to some rows and the first keys."""
    if t.shape[2] > 1:
        t = t[:, :, rows]
    if t.shape[3] > 1:
        t = t[:, :, :, :key_count]
    return t


def allowed_pairs(problem: Problem, inputs: Inputs, rows: slice, key_count: int):
    """(b, h, rows, key_count) bool: causal, attn_mask and key padding (SPEC section 2)."""
    device = problem.device
    row_ids = torch.arange(rows.start, rows.stop, device=device)
    key_ids = torch.arange(key_count, device=device)
    allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    if problem.causal:
        allowed = allowed & (key_ids[None, :] <= row_ids[:, None] + problem.causal_offset)
    if inputs.attn_mask is not None:
        allowed = allowed & rows_and_keys(inputs.attn_mask, rows, key_count)
    if inputs.key_padding_mask is not None:
        allowed = allowed & inputs.key_padding_mask[:, None, None, :key_count]
    shape = torch.broadcast_shapes(allowed.shape, (1, 1, len(row_ids), key_count))
    return allowed.expand(shape)


def rowwise_keep(problem: Problem, inputs: Inputs, row_start: int, row_end: int,
                 allowed: torch.Tensor) -> torch.Tensor:
    """General case: bool (B', H', rows, Sk) of kept keys for rows [row_start, row_end).

    `allowed` broadcasts to (B, H, rows, Sk) and already holds every mask. Scores are
    key_bias + attn_bias in float32; ties go to the later key. O(rows x Sk) memory.
    """
    sel = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=problem.device)
    if inputs.key_bias is not None:
        sel = sel + to_query_heads(inputs.key_bias.detach().float(), problem.heads)[:, :, None, :]
    if inputs.attn_bias is not None:
        ab = inputs.attn_bias.detach()
        if ab.shape[2] > 1:
            ab = ab[:, :, row_start:row_end]
        sel = sel + to_query_heads(ab.float(), problem.heads)
    allowed = to_query_heads(allowed, problem.heads)
    shape = torch.broadcast_shapes(sel.shape, allowed.shape)
    shape = shape[:2] + (row_end - row_start, problem.seqlen_k)
    allowed = allowed.expand(shape)
    top = best_first_order(sel.expand(shape), allowed)[..., : problem.window]
    keep = torch.zeros(shape, dtype=torch.bool, device=problem.device)
    keep.scatter_(-1, top, True)
    return keep & allowed


def rowwise_keep_all(problem: Problem, inputs: Inputs) -> Optional[torch.Tensor]:
    """The row-wise case for all rows at once (O(Sq x Sk) bool), for kernels that read it
    like an attn_mask in place of the masks; None in the other cases."""
    if problem.selection != SELECT_ROWWISE:
        return None
    allowed = allowed_pairs(problem, inputs, slice(0, problem.seqlen_q), problem.seqlen_k)
    return rowwise_keep(problem, inputs, 0, problem.seqlen_q, allowed)
