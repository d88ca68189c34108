"""Numba kernels for the interval plan on CPUs (same result as the torch path in
selection.py, which the tests check against brute force).

Both follow the plan's monotone structure instead of sorting: a row's threshold comes from a
heap of the window's best ranks over its growing key prefix (O(Sk log w) per plan head), and a
block's candidate list from the previous block's list (keys whose interval has ended drop out,
keys whose interval starts join at the end, so the list stays ascending): O(n_blocks x list).
"""

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _sift_down(heap, size):
    """Restore the max-heap property from the root."""
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and heap[child + 1] > heap[child]:
            child += 1
        if heap[i] >= heap[child]:
            return
        heap[i], heap[child] = heap[child], heap[i]
        i = child


@njit(cache=True)
def _push(heap, size, value):
    heap[size] = value
    i = size
    while i > 0 and heap[(i - 1) // 2] < heap[i]:
        parent = (i - 1) // 2
        heap[i], heap[parent] = heap[parent], heap[i]
        i = parent


@njit(parallel=True, cache=True)
def row_thresholds(ranks, allowed, limit, window, tau):
    """tau[r, i]: the window-th best (smallest) rank among allowed keys j < limit[i], or Sk
    when row i has at most `window` allowed keys. `limit` never decreases along the rows."""
    n, sk = ranks.shape
    for r in prange(n):
        heap = np.empty(window, np.int64)  # the window best ranks so far; worst on top
        size = 0
        seen = 0  # allowed keys in the prefix
        j = 0
        for i in range(limit.shape[0]):
            while j < limit[i]:
                if allowed[r, j]:
                    seen += 1
                    if size < window:
                        _push(heap, size, ranks[r, j])
                        size += 1
                    elif ranks[r, j] < heap[0]:
                        heap[0] = ranks[r, j]
                        _sift_down(heap, size)
                j += 1
            tau[r, i] = heap[0] if seen > window else sk


@njit(parallel=True, cache=True)
def candidate_lists(first_row, end_row, seqlen_q, block_m, full_first, candidates, counts,
                    full_counts):
    """Per block of rows, the ascending keys j with a non-empty interval [first_j, end_j)
    that meets the block (with `full_first`, those whose interval covers the whole block
    first). first_row never decreases along the keys (causal bound or 0)."""
    n, sk = first_row.shape
    n_blocks, width = candidates.shape[1], candidates.shape[2]
    for r in prange(n):
        active = np.empty(sk, np.int64)
        size = 0
        j = 0
        for block in range(n_blocks):
            lo = block * block_m
            hi = min(seqlen_q, lo + block_m)
            kept = 0
            for a in range(size):  # drop keys whose interval ended before this block
                if end_row[r, active[a]] > lo:
                    active[kept] = active[a]
                    kept += 1
            size = kept
            while j < sk and first_row[r, j] < hi:  # keys whose interval starts by now
                if end_row[r, j] > first_row[r, j] and end_row[r, j] > lo:
                    active[size] = j
                    size += 1
                j += 1
            count = min(size, width)
            slot = 0
            if full_first:
                for a in range(count):
                    key = active[a]
                    if first_row[r, key] <= lo and end_row[r, key] >= hi:
                        candidates[r, block, slot] = key
                        slot += 1
            full_counts[r, block] = slot
            for a in range(count):
                key = active[a]
                if not (full_first and first_row[r, key] <= lo and end_row[r, key] >= hi):
                    candidates[r, block, slot] = key
                    slot += 1
            for a in range(count, width):
                candidates[r, block, a] = -1
            counts[r, block] = count
