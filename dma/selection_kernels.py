"""Triton kernels for the interval plan on GPUs (same result as the torch path in
selection.py, which stays the reference and the CPU path).

The whole plan takes five launches (the torch path in selection.py takes about forty small
ops, whose launch overhead dominated the plan's time on GPUs):

* `_sort_keys_kernel`: per chunk of keys of a plan head, the int32 sort key of every key (the
  score's order-preserving bits, int16 for bfloat16 scores; disallowed keys get the smallest
  value), stored in reverse key order, and the number of allowed keys; then one stable
  torch.sort (descending) gives `order` (keys best first, later keys first among ties);
* `_ranks_kernel`: `order` as int32 and its inverse `rank`;
  shorter rows are sorted without torch: in one program each (`_sort_row_kernel`), or in
  chunks that `_merge_ranks_kernel` then merges (see `triton_sort` in selection.py);
* `_row_threshold_kernel` and `_candidates_kernel` below, one program per (query block,
  plan head), between which `_key_intervals_kernel` turns the thresholds into each key's row
  interval [first_row, end_row).

* `_row_threshold_kernel` finds tau for the block's rows. The block's first row keeps the w
  best of its prefix; each later row adds one new key, so the rows' thresholds lie between
  the (w - BLOCK_M)-th and the w-th best of the first row's prefix. A 1-D scan of `order`
  (a coarse count over wide chunks, then a detailed scan) finds those two ranks and the
  BLOCK_M ranks of the first row's keys between them; with the ranks of the block's new
  keys they are the only places where a row's count of better keys grows, so a sort of
  those 2 x BLOCK_M events and a (rows x events) scan give each row's threshold. Work per
  block: the 1-D scan (about w x Sk / prefix length entries) and BLOCK_M x 2 BLOCK_M, not
  rows x keys (nor rows x the rank window, which grows as Sk / prefix length for the early
  blocks of long sequences).
* `_candidates_kernel` lists the keys kept by any row of the block: those with first_row <
  block end and end_row > block start (ascending; with FULL_FIRST, the keys kept by every
  row of the block first, each part in no set order). One program serves several
  consecutive blocks: it scans for the first of them only (every earlier key, or, with
  RANK_SCAN, the first row's threshold's prefix of the best-first order when that is
  shorter), and derives each later block's list from the one before (the keys still kept,
  plus the keys the causal limit adds), which takes the work from blocks x keys to about
  blocks x (window + BLOCK_M) for long sequences.

Decoding (one query row) needs neither thresholds nor a sort: a radix select of the
window-th best score (`_decode_histogram_kernel`, three launches), then
`_decode_chunk_counts_kernel` and `_decode_plan_kernel` give the key intervals and the one
candidate list (at the end of this file).
"""

import triton
import triton.language as tl

EVENT_TAG_BITS = tl.constexpr(16)  # an event packs (rank << 16) | tag; tag BLOCK_M: an old key
EVENT_TAG_MASK = tl.constexpr(0xFFFF)
NO_EVENT = tl.constexpr(9223372036854775807)  # sorts after every event
INT64_MIN = tl.constexpr(-(2**63))  # below every packed key (_packed_best_first's padding)


@triton.jit
def _causal_key_limit(row, causal_offset, seqlen_k):
    """How many keys row `row` may see under bottom-right causality (keys 0..limit - 1),
    as `row_key_limit` in selection.py gives it."""
    return tl.minimum(tl.maximum(row + causal_offset + 1, 0), seqlen_k)


@triton.jit
def _causal_first_row(keys, causal_offset):
    """The first row that may see each key under bottom-right causality."""
    return tl.maximum(keys - causal_offset, 0)


@triton.jit
def _row_threshold_kernel(
    ORDER, RANK, N_ALLOWED, TAU, EVENTS,
    sorder_n, stau_n, sevents_n, seqlen_q, seqlen_k, causal_offset, window,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SCAN_CHUNK: tl.constexpr,
    ECHUNK: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)  # plan head; n x its stride may pass 2^31
    big = seqlen_k  # "keeps every allowed key"
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if CAUSAL:
        first_limit = _causal_key_limit(block * BLOCK_M, causal_offset, seqlen_k)
        limits = _causal_key_limit(rows, causal_offset, seqlen_k)
    else:
        first_limit = seqlen_k
        limits = tl.zeros([BLOCK_M], tl.int32) + seqlen_k
    n_allowed = tl.load(N_ALLOWED + n)
    order = ORDER + n * sorder_n
    events = EVENTS + n * sevents_n + block * (2 * BLOCK_M)
    target_lo = tl.maximum(window - BLOCK_M, 0)

    # A coarse count finds where to start the detailed scan below: the start of the
    # SCAN_CHUNK of `order` in which the first row's count of old keys (< first_limit)
    # reaches target_lo. Blocks whose last row sees at most `window` keys keep all of them.
    keeps_all = tl.max(limits, 0) <= window
    x_lo = tl.where(keeps_all, n_allowed, 0)  # keeping all: both scans start past the end
    count_lo = 0
    count = 0
    x0 = x_lo
    while (count < window) & (x0 < n_allowed):
        offs = x0 + tl.arange(0, SCAN_CHUNK)
        idx = tl.load(order + offs, mask=offs < n_allowed, other=seqlen_k)
        here = tl.sum(((offs < n_allowed) & (idx < first_limit)).to(tl.int32), 0)
        before_crossing = count + here < target_lo
        x_lo = tl.where(before_crossing, x0 + SCAN_CHUNK, x_lo)
        count_lo = tl.where(before_crossing, count + here, count_lo)
        count += here
        x0 += SCAN_CHUNK

    # Detailed scan from there: the ranks r_lo and t0 where the count reaches target_lo and
    # window, and, as events in EVENTS, the ranks of the old keys counted target_lo + 1 ..
    # window (ascending).
    r_lo = tl.where((target_lo == 0) & ~keeps_all, -1, big)
    t0 = big
    count = count_lo
    x0 = x_lo
    while (t0 == big) & (x0 < n_allowed):
        offs = x0 + tl.arange(0, CHUNK)
        idx = tl.load(order + offs, mask=offs < n_allowed, other=seqlen_k)
        active = (offs < n_allowed) & (idx < first_limit)
        running = tl.cumsum(active.to(tl.int32), 0) + count
        r_lo = tl.minimum(r_lo, tl.min(tl.where(active & (running == target_lo), offs, big), 0))
        t0 = tl.minimum(t0, tl.min(tl.where(active & (running == window), offs, big), 0))
        in_window = active & (running > target_lo) & (running <= window)
        tl.store(events + running - target_lo - 1,
                 (offs.to(tl.int64) << EVENT_TAG_BITS) | BLOCK_M, mask=in_window)
        count += tl.sum(active.to(tl.int32), 0)
        x0 += CHUNK

    tau = tl.zeros([BLOCK_M], tl.int32) + big
    if r_lo < big:
        # Up to r_lo every row counts target_lo old keys. After it a row's count grows at the
        # old events (every row) and at its own new keys: at most 2 x BLOCK_M events, merged
        # in rank order by one sort. New keys ranked before r_lo join the events too (a row
        # counts them before any old event, where no count can reach w yet), so that no
        # rows x new keys tile is needed for them.
        last = tl.where(t0 < big, t0, n_allowed - 1)
        n_old = tl.minimum(count, window) - target_lo
        slot = tl.arange(0, 2 * BLOCK_M)
        tl.debug_barrier()  # the scan's events are stored
        old = tl.load(events + slot, mask=slot < n_old, other=NO_EVENT)
        key = first_limit + slot - BLOCK_M  # slots from BLOCK_M on: the new keys
        is_new = (slot >= BLOCK_M) & (key < seqlen_k)
        rank = tl.load(RANK + n * sorder_n + key, mask=is_new, other=big)
        new_event = is_new & (rank <= last)
        merged = tl.where(new_event, (rank.to(tl.int64) << EVENT_TAG_BITS) | (slot - BLOCK_M), old)
        merged = tl.sort(merged)
        tl.debug_barrier()  # every old event is loaded before the merged ones overwrite them
        tl.store(events + slot, merged)
        tl.debug_barrier()
        # 2-D scan of the events: rows x events, a row's threshold where its count reaches w.
        counts = tl.zeros([BLOCK_M], tl.int32) + target_lo
        for x in range(0, 2 * BLOCK_M, ECHUNK):
            event = tl.load(events + x + tl.arange(0, ECHUNK))
            ev_rank = (event >> EVENT_TAG_BITS).to(tl.int32)
            tag = (event & EVENT_TAG_MASK).to(tl.int32)
            applies = (event != NO_EVENT)[None, :] & (
                (tag[None, :] == BLOCK_M) | (first_limit + tag[None, :] < limits[:, None]))
            running = tl.cumsum(applies.to(tl.int32), 1) + counts[:, None]
            hit = tl.min(tl.where(applies & (running == window), ev_rank[None, :], big), 1)
            tau = tl.minimum(tau, hit)
            counts += tl.sum(applies.to(tl.int32), 1)
    tl.store(TAU + n * stau_n + rows, tau, mask=rows < seqlen_q)


FULL_FLAG = tl.constexpr(-2147483648)  # bit 31 of a listed key: every row of the block keeps it
KEY_BITS = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _listed_and_full(END, send_n, n, keys, ok, row_lo, row_hi, causal_offset,
                     CAUSAL: tl.constexpr):
    """For some keys of plan head n: (listed: kept by a row of the block [row_lo, row_hi),
    full: kept by all of them). A key's first row is its causal start (0 without causal),
    as `_key_intervals_kernel` writes it, so only its end row is read."""
    end = tl.load(END + n * send_n + keys, mask=ok, other=0)
    first = tl.zeros(keys.shape, tl.int32)
    if CAUSAL:
        first = _causal_first_row(keys, causal_offset)
    listed = ok & (end > first) & (first < row_hi) & (end > row_lo)
    full = listed & (first <= row_lo) & (end >= row_hi)
    return listed, full


@triton.jit
def _append_listed(keys, ok, listed_keys, n_listed, n_full, END, send_n, n, row_lo, row_hi,
                   causal_offset, CAUSAL: tl.constexpr):
    """Append the listed ones of some keys to `listed_keys` (with FULL_FLAG set on
    the fully kept ones, which saves the write pass a second look at their end rows); the
    updated counts of listed and fully kept keys."""
    listed, full = _listed_and_full(END, send_n, n, keys, ok, row_lo, row_hi, causal_offset,
                                    CAUSAL)
    slot = tl.cumsum(listed.to(tl.int32), 0) - 1 + n_listed
    tl.store(listed_keys + slot, tl.where(full, keys | FULL_FLAG, keys), mask=listed)
    return (n_listed + tl.sum(listed.to(tl.int32), 0),
            n_full + tl.sum(full.to(tl.int32), 0))


@triton.jit
def _candidates_kernel(
    END, ORDER, TAU, N_ALLOWED, CAND, COUNT, FULL, LISTED,
    send_n, sorder_n, stau_n, scand_n, scand_blk, scount_n, slisted_n, slisted_program,
    n_blocks, blocks_per_program, seqlen_q, seqlen_k, causal_offset, width,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, FULL_FIRST: tl.constexpr,
    RANK_SCAN: tl.constexpr,
):
    """The candidate lists of `blocks_per_program` consecutive blocks of one plan head.

    The first block's listed keys are its first row's kept keys plus the keys that the
    causal limit adds within the block (a key that the first row may see but does not keep
    is kept by no later row either). The first row's kept keys come from the shorter of two
    scans: every key it may see, in key order (their end rows), or, with RANK_SCAN, the
    keys best first up to its threshold (ORDER up to TAU), which is about window x Sk /
    prefix keys, far fewer than the prefix for late rows. A later block's listed keys are
    among the previous block's and the keys that the causal limit adds, so each later block
    filters at most width + BLOCK_M keys. LISTED holds, per program, two buffers of `width`
    slots that pass the listed keys from block to block (in the order they were listed); a
    block whose keys a rank scan found lists them in its candidate list directly, already in
    full-first order (best first), and the next block reads them there. Programs run last
    to first: the later blocks scan the most keys, so they start first."""
    program = tl.num_programs(0) - 1 - tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    buffers = LISTED + n * slisted_n + program * slisted_program
    first_block = program * blocks_per_program
    n_listed = 0  # the previous block's listed keys (in the other buffer or in place)
    key_lo = 0  # keys from key_lo on are new to this program
    in_place = 0  # whether the block listed its keys in its candidate list (as it goes)
    for i in range(0, tl.minimum(blocks_per_program, n_blocks - first_block)):
        block = first_block + i
        row_lo = block * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, seqlen_q)
        key_hi = seqlen_k
        if CAUSAL:
            key_hi = _causal_key_limit(row_hi - 1, causal_offset, seqlen_k)
        out = CAND + n * scand_n + block * scand_blk
        previous = buffers + ((i + 1) % 2) * width
        if in_place:
            previous = out - scand_blk
        listed_keys = buffers + (i % 2) * width
        in_place = 0
        # The block's listed keys: the previous block's that it keeps (or the first row's
        # kept keys, by rank), then the new ones (consecutive, so their end rows load as
        # whole vectors); and how many of them every row keeps.
        n_listed_here = 0
        n_full = 0
        for x0 in range(0, n_listed, CHUNK):
            x = x0 + tl.arange(0, CHUNK)
            ok = x < n_listed
            keys = tl.load(previous + x, mask=ok, other=0) & KEY_BITS
            n_listed_here, n_full = _append_listed(
                keys, ok, listed_keys, n_listed_here, n_full, END, send_n, n, row_lo, row_hi,
                causal_offset, CAUSAL)
        if RANK_SCAN:
            if i == 0:
                seen_lo = seqlen_k  # keys below seen_lo: those the first row may see
                if CAUSAL:
                    seen_lo = _causal_key_limit(row_lo, causal_offset, seqlen_k)
                # Positions 0..tau of ORDER hold the first row's kept keys among others
                # (tau = Sk: it keeps every allowed key, and the allowed ones come first).
                ranked = tl.minimum(tl.load(TAU + n * stau_n + row_lo) + 1,
                                    tl.load(N_ALLOWED + n))
                if ranked < seen_lo:
                    # Every row keeps the positions up to the last row's threshold, so the
                    # keys come best first in full-first order: straight to the candidate
                    # list, the new keys after them (they enter after the first row, so
                    # no row before theirs keeps them: never fully kept).
                    last_tau = tl.load(TAU + n * stau_n + row_hi - 1)
                    for x0 in range(0, ranked, CHUNK):
                        x = x0 + tl.arange(0, CHUNK)
                        keys = tl.load(ORDER + n * sorder_n + x, mask=x < ranked, other=0)
                        listed = (x < ranked) & (keys < seen_lo)
                        slot = tl.cumsum(listed.to(tl.int32), 0) - 1 + n_listed_here
                        tl.store(out + slot, keys, mask=listed)
                        n_listed_here += tl.sum(listed.to(tl.int32), 0)
                        n_full += tl.sum((listed & (x <= last_tau)).to(tl.int32), 0)
                    key_lo = seen_lo
                    listed_keys = out
                    in_place = 1
        for x0 in range(key_lo // CHUNK * CHUNK, key_hi, CHUNK):  # aligned: whole vectors
            keys = x0 + tl.arange(0, CHUNK)
            n_listed_here, n_full = _append_listed(
                keys, (keys >= key_lo) & (keys < key_hi), listed_keys, n_listed_here, n_full,
                END, send_n, n, row_lo, row_hi, causal_offset, CAUSAL)
        tl.debug_barrier()  # the list is stored; the previous one is read
        # The candidate list: with FULL_FIRST, the keys that every row keeps go first.
        full_slot = 0
        other_slot = n_full
        # A list written in place is already in full-first order: no pass over it.
        for x0 in range(0, tl.where(in_place != 0, 0, n_listed_here), CHUNK):
            x = x0 + tl.arange(0, CHUNK)
            ok = x < n_listed_here
            entry = tl.load(listed_keys + x, mask=ok, other=0)
            keys = entry & KEY_BITS
            slot = x
            if FULL_FIRST:
                full = ok & ((entry & FULL_FLAG) != 0)
                other = ok & (full == 0)
                slot = tl.where(full, tl.cumsum(full.to(tl.int32), 0) - 1 + full_slot,
                                tl.cumsum(other.to(tl.int32), 0) - 1 + other_slot)
                full_slot += tl.sum(full.to(tl.int32), 0)
                other_slot += tl.sum(other.to(tl.int32), 0)
            tl.store(out + slot, keys, mask=ok)
        tl.store(COUNT + n * scount_n + block, n_listed_here)
        tl.store(FULL + n * scount_n + block, tl.where(FULL_FIRST, n_full, 0))
        for x0 in range(0, width, CHUNK):  # slots past the count read -1
            slots = x0 + tl.arange(0, CHUNK)
            pad = (slots >= n_listed_here) & (slots < width)
            tl.store(out + slots, tl.full([CHUNK], -1, tl.int32), mask=pad)
        n_listed = n_listed_here
        key_lo = tl.maximum(key_lo, key_hi)


@triton.jit
def _sortable_scores(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, n, keys,
                     seqlen_k):
    """(int32 whose integer order is the float32 order of the scores, allowed) of some keys of
    plan head n. Scores come in key_bias's dtype; without HAS_ALLOWED every key is allowed."""
    ok = keys < seqlen_k
    score = tl.load(SCORES + n * sscore_n + keys, mask=ok, other=0.0).to(tl.float32)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as 0.0, as floats compare
    bits = score.to(tl.int32, bitcast=True)
    allowed = ok
    if HAS_ALLOWED:
        allowed = ok & (tl.load(ALLOWED + n * sallowed_n + keys, mask=ok, other=0) != 0)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF), allowed


@triton.jit
def _sort_keys_kernel(SCORES, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, SORT_KEYS,
                      N_ALLOWED, sscore_n, seqlen_k, CHUNK: tl.constexpr,
                      SHORT_KEYS: tl.constexpr):
    """One chunk of keys of one plan head: the int32 sort key of key j (its score's
    order-preserving bits; the smallest int32, which no score takes, if disallowed) at
    position Sk - 1 - j, so that a stable descending sort puts later keys first among ties.
    With SHORT_KEYS (bfloat16 scores, whose float32 bits below the top 16 are zero) the
    top 16 bits as int16 keep the same order in half the sort's passes. N_ALLOWED (zeroed)
    gathers the allowed count."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
    sortable, allowed = _sortable_scores(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n,
                                         keys, seqlen_k)
    sort_key = tl.where(allowed, sortable, -2147483648)
    if SHORT_KEYS:
        sort_key = (sort_key >> 16).to(tl.int16)  # the smallest int32 becomes the smallest int16
    tl.store(SORT_KEYS + n * seqlen_k + seqlen_k - 1 - keys, sort_key, mask=keys < seqlen_k)
    tl.atomic_add(N_ALLOWED + n, tl.sum(allowed.to(tl.int32), 0))


@triton.jit
def _packed_best_first(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, n,
                       keys, seqlen_k):
    """(packed, allowed) of some keys of plan head n: each key's sort key and its index in
    one int64, so that one descending sort orders keys best first and later keys first
    among ties, as the stable sort of `_sort_keys_kernel`'s keys does. Slots past Sk pack as
    the smallest value (sort_key * 2^32 + key is never below it), so they sort last; the one
    real key that may equal it (a disallowed key 0) decodes the same."""
    sortable, allowed = _sortable_scores(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n,
                                         keys, seqlen_k)
    sort_key = tl.where(allowed, sortable, -2147483648).to(tl.int64)
    packed = tl.where(keys < seqlen_k, (sort_key << 32) | keys.to(tl.int64), INT64_MIN)
    return packed, allowed


@triton.jit
def _sort_row_kernel(SCORES, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, ORDER, RANK,
                     N_ALLOWED, sscore_n, seqlen_k, ROW: tl.constexpr):
    """`_sort_keys_kernel`, the stable sort and `_ranks_kernel` in one program per plan head,
    for rows of at most ROW keys (a power of two): one descending sort of the packed keys.
    Saves the host the sort's own launches."""
    keys = tl.arange(0, ROW)
    n = tl.program_id(0).to(tl.int64)
    packed, allowed = _packed_best_first(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n,
                                         keys, seqlen_k)
    best_first = (tl.sort(packed, descending=True) & 0xFFFFFFFF).to(tl.int32)
    ok = keys < seqlen_k
    tl.store(ORDER + n * seqlen_k + keys, best_first, mask=ok)
    tl.store(RANK + n * seqlen_k + best_first, keys, mask=ok)
    tl.store(N_ALLOWED + n, tl.sum(allowed.to(tl.int32), 0))


@triton.jit
def _sort_chunk_kernel(SCORES, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, SORTED,
                       CHUNK_ALLOWED, sscore_n, seqlen_k, n_chunks, ROW: tl.constexpr):
    """Longer rows, first step: one chunk of ROW keys of a plan head, its packed keys sorted
    best first into SORTED (n, n_chunks x ROW), and its allowed count."""
    chunk = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    slots = tl.arange(0, ROW)
    packed, allowed = _packed_best_first(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n,
                                         chunk * ROW + slots, seqlen_k)
    tl.store(SORTED + (n * n_chunks + chunk) * ROW + slots, tl.sort(packed, descending=True))
    tl.store(CHUNK_ALLOWED + n * n_chunks + chunk, tl.sum(allowed.to(tl.int32), 0))


@triton.jit
def _merge_ranks_kernel(SORTED, CHUNK_ALLOWED, ORDER, RANK, N_ALLOWED, seqlen_k, n_chunks,
                        ROW: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                        CHUNKS_PAD: tl.constexpr):
    """Longer rows, second step, for BLOCK entries of one sorted chunk: an entry's place in
    its whole row is its place in its chunk plus, for every other chunk, the number of that
    chunk's entries above it, found by binary searches in all other chunks at once
    (SEARCH_STEPS = log2(ROW) + 1 probes each; the chunks' entries descend, and the packed
    keys of a row all differ, padding aside). Writes ORDER and its inverse RANK, as
    `_ranks_kernel` does, and (first program of each plan head) the allowed count."""
    n = tl.program_id(1).to(tl.int64)
    start = tl.program_id(0) * BLOCK
    chunk = start // ROW
    local = start - chunk * ROW + tl.arange(0, BLOCK)
    row = SORTED + n * n_chunks * ROW
    entry = tl.load(row + chunk * ROW + local)[None, :]
    others = tl.arange(0, CHUNKS_PAD)[:, None]
    searched = (others < n_chunks) & (others != chunk)
    other_row = row + others * ROW
    # `above` entries of each other chunk are known to sort above the entry, and at most
    # `above + half` are; a chunk not searched reads as INT64_MIN and counts none
    above = tl.zeros([CHUNKS_PAD, BLOCK], tl.int32)
    for step in tl.static_range(SEARCH_STEPS - 1):
        half = ROW >> (step + 1)
        probe = tl.load(other_row + above + half - 1, mask=searched, other=INT64_MIN)
        above = tl.where(probe > entry, above + half, above)
    last = tl.load(other_row + above, mask=searched, other=INT64_MIN)
    place = local + tl.sum(above + (last > entry).to(tl.int32), 0)
    key = (tl.reshape(entry, [BLOCK]) & 0xFFFFFFFF).to(tl.int32)
    real = local < seqlen_k - chunk * ROW  # the last chunk's padding sorts after its keys
    tl.store(ORDER + n * seqlen_k + place, key, mask=real)
    tl.store(RANK + n * seqlen_k + key, place, mask=real)
    if tl.program_id(0) == 0:
        chunks = tl.arange(0, CHUNKS_PAD)
        counts = tl.load(CHUNK_ALLOWED + n * n_chunks + chunks, mask=chunks < n_chunks,
                         other=0)
        tl.store(N_ALLOWED + n, tl.sum(counts, 0))


@triton.jit
def _ranks_kernel(SORTED_POSITIONS, ORDER, RANK, seqlen_k, CHUNK: tl.constexpr):
    """`order` (keys best first) from the sort's positions (Sk - 1 - key, see
    `_sort_keys_kernel`), and its inverse `rank`."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
    ok = offs < seqlen_k
    position = tl.load(SORTED_POSITIONS + n * seqlen_k + offs, mask=ok, other=0).to(tl.int32)
    key = seqlen_k - 1 - position
    tl.store(ORDER + n * seqlen_k + offs, key, mask=ok)
    tl.store(RANK + n * seqlen_k + key, offs, mask=ok)


@triton.jit
def _key_intervals_kernel(RANK, TAU, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, FIRST, END,
                          stau_n, seqlen_q, seqlen_k, causal_offset, search_steps,
                          CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """Row i keeps key j iff j < limit_i and rank_j <= tau_i. tau never increases with i, so
    the rows with rank_j <= tau_i are a prefix [0, end) (a binary search); the causal limit
    gives the start, and an empty interval reads as first == end."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
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
    end = lo
    if HAS_ALLOWED:
        allowed = tl.load(ALLOWED + n * sallowed_n + keys, mask=ok, other=0) != 0
        end = tl.where(allowed, lo, 0)
    first = tl.zeros([CHUNK], tl.int32)
    if CAUSAL:
        first = _causal_first_row(keys, causal_offset)
    end = tl.maximum(end, first)
    tl.store(FIRST + n * seqlen_k + keys, first, mask=ok)
    tl.store(END + n * seqlen_k + keys, end, mask=ok)


# Decoding (one query row): the row keeps its `window` best allowed keys. A radix select
# finds the window-th best score without sorting: the order-preserving 32 bits of each score
# split into three digits (11, 11 and 10 bits); level L histograms digit L of the keys whose
# higher digits equal the chosen ones, and the next launch picks, from that histogram, the
# bin holding the window-th best. Every program re-derives the chosen bins from the small
# histograms (2048 counts), so no launch waits for a reduction. Ties at the threshold go to
# the later keys, as in the general plan. 16-bit scores need two levels only: their float32
# bits below the top 19 are zero, so keys that share the first two digits share all 32 bits
# (the last digit is the same for all of them), and the second histogram's bin counts the
# ties.

BINS = tl.constexpr(2048)  # per histogram: 2^11, the widest digit


@triton.jit
def _sortable_u32(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, n, keys,
                  seqlen_k):
    """`_sortable_scores` as unsigned values (int64 in [0, 2^32)), whose digits the radix
    select reads."""
    sortable, allowed = _sortable_scores(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n,
                                         keys, seqlen_k)
    return sortable.to(tl.int64) + 2147483648, allowed


@triton.jit
def _pick_bin(HIST, need):
    """The bin (higher = better) that holds the need-th best entry of a histogram, and the
    rank (1-based) of that entry inside the bin."""
    bins = tl.arange(0, BINS)
    counts = tl.load(HIST + bins)
    above = tl.sum(counts, 0) - tl.cumsum(counts, 0)  # entries in better bins
    hit = (above < need) & (above + counts >= need)
    chosen = tl.max(tl.where(hit, bins, -1), 0)
    return chosen, need - tl.sum(tl.where(bins == chosen, above, 0), 0)


@triton.jit
def _chosen_prefix(HIST, window, LEVELS: tl.constexpr):
    """The value of the first LEVELS digits of the window-th best score, and the rank left
    to find among the keys that share them."""
    chosen, need = _pick_bin(HIST, window)
    prefix = chosen.to(tl.int64) << 21
    if LEVELS > 1:
        chosen, need = _pick_bin(HIST + BINS, need)
        prefix = prefix | (chosen.to(tl.int64) << 10)
    if LEVELS > 2:
        chosen, need = _pick_bin(HIST + 2 * BINS, need)
        prefix = prefix | chosen.to(tl.int64)
    return prefix, need


@triton.jit
def _decode_histogram_kernel(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr,
                             HIST, shist_n, seqlen_k, window, LEVEL: tl.constexpr,
                             CHUNK: tl.constexpr):
    """Histogram of digit LEVEL over the keys whose higher digits are the chosen ones. HIST
    (zeroed) holds per plan head three 2048-bin histograms and, after them, the allowed count
    (level 0 adds it). Heads with at most `window` allowed keys keep them all and skip."""
    keys = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
    hist = HIST + n * shist_n
    value, allowed = _sortable_u32(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n, keys,
                                   seqlen_k)
    if LEVEL == 0:
        tl.atomic_add(hist + (value >> 21), tl.full([CHUNK], 1, tl.int32), mask=allowed)
        tl.atomic_add(hist + 3 * BINS, tl.sum(allowed.to(tl.int32), 0))
    elif tl.load(hist + 3 * BINS) > window:
        prefix, need = _chosen_prefix(hist, window, LEVEL)
        if LEVEL == 1:
            match = allowed & ((value >> 21) == (prefix >> 21))
            digit = (value >> 10) & 2047
        else:
            match = allowed & ((value >> 10) == (prefix >> 10))
            digit = value & 1023
        tl.atomic_add(hist + LEVEL * BINS + digit, tl.full([CHUNK], 1, tl.int32), mask=match)


@triton.jit
def _decode_keep(value, allowed, hist, window, n_allowed, LEVELS: tl.constexpr):
    """(kept above the threshold, tied at it) for some keys, and how many of all the tied
    keys (the first ones by index) are dropped. A head with at most `window` allowed keys
    keeps all. With LEVELS == 2 the first two digits stand for the whole value."""
    threshold, need = _chosen_prefix(hist, window, LEVELS)
    if LEVELS == 3:
        dropped = tl.load(hist + 2 * BINS + (threshold & 1023)) - need
    else:
        threshold = threshold >> 10
        value = value >> 10
        dropped = tl.load(hist + BINS + (threshold & 2047)) - need
    # Keeping everything (the histograms past level 0 are then empty): a threshold below
    # every value (values are >= 0)
    everything = n_allowed <= window
    threshold = tl.where(everything, -1, threshold)
    dropped = tl.where(everything, 0, dropped)
    return allowed & (value > threshold), allowed & (value == threshold), dropped


@triton.jit
def _decode_chunk_counts_kernel(SCORES, sscore_n, ALLOWED, sallowed_n,
                                HAS_ALLOWED: tl.constexpr, HIST, shist_n, CHUNK_COUNTS,
                                n_chunks, seqlen_k, window, CHUNK: tl.constexpr,
                                LEVELS: tl.constexpr):
    """Per chunk of keys: how many are kept above the threshold, and how many tie at it."""
    chunk = tl.program_id(0)
    keys = chunk * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
    hist = HIST + n * shist_n
    value, allowed = _sortable_u32(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n, keys,
                                   seqlen_k)
    above, tied, _ = _decode_keep(value, allowed, hist, window, tl.load(hist + 3 * BINS), LEVELS)
    out = CHUNK_COUNTS + (n * n_chunks + chunk) * 2
    tl.store(out, tl.sum(above.to(tl.int32), 0))
    tl.store(out + 1, tl.sum(tied.to(tl.int32), 0))


@triton.jit
def _decode_plan_kernel(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED: tl.constexpr, HIST,
                        shist_n, CHUNK_COUNTS, FIRST, END, CAND, COUNT, scand_n, n_chunks,
                        seqlen_k, window, width, CHUNK: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                        LEVELS: tl.constexpr):
    """The plan of one chunk of keys: kept keys get the row interval [0, 1), the others
    [0, 0), and kept keys take their ascending slot in the candidate list (kept keys in
    earlier chunks, plus a scan of this one). Of the keys tied at the threshold the first
    `dropped` go. Slots from the kept count up to `width` read -1, each written by the
    program whose chunk range holds it."""
    chunk = tl.program_id(0)
    keys = chunk * CHUNK + tl.arange(0, CHUNK)
    n = tl.program_id(1).to(tl.int64)
    hist = HIST + n * shist_n
    n_allowed = tl.load(hist + 3 * BINS)
    value, allowed = _sortable_u32(SCORES, sscore_n, ALLOWED, sallowed_n, HAS_ALLOWED, n, keys,
                                   seqlen_k)
    above, tied, dropped = _decode_keep(value, allowed, hist, window, n_allowed, LEVELS)
    others = tl.arange(0, CHUNKS_PAD)
    counts = CHUNK_COUNTS + (n * n_chunks + others) * 2
    earlier = others < chunk
    above_before = tl.sum(tl.load(counts, mask=earlier, other=0), 0)
    tied_before = tl.sum(tl.load(counts + 1, mask=earlier, other=0), 0)
    tied_rank = tied_before + tl.cumsum(tied.to(tl.int32), 0) - 1
    kept = above | (tied & (tied_rank >= dropped))
    kept_before = above_before + tl.maximum(tied_before - dropped, 0)
    slot = kept_before + tl.cumsum(kept.to(tl.int32), 0) - 1
    ok = keys < seqlen_k
    tl.store(FIRST + n * seqlen_k + keys, tl.zeros([CHUNK], tl.int32), mask=ok)
    tl.store(END + n * seqlen_k + keys, kept.to(tl.int32), mask=ok)
    tl.store(CAND + n * scand_n + slot, keys, mask=kept)
    total = tl.minimum(n_allowed, window)
    pad = keys  # this program's share of the slots
    tl.store(CAND + n * scand_n + pad, tl.full([CHUNK], -1, tl.int32),
             mask=(pad >= total) & (pad < width))
    if chunk == 0:
        tl.store(COUNT + n, total)
