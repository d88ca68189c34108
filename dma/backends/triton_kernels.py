"""Triton kernels of the triton backend.

Every kernel walks the same two kinds of key tiles, so they read side by side:

* dense tiles (INTERVAL=False): consecutive keys 0..limit, with causal, attn_mask, key padding
  and attn_bias applied per element (broadcast dims have stride 0 and are never materialised);
* candidate tiles (INTERVAL=True, the DMA case): the query block's candidate keys from the
  selection plan, gathered from K and V; a key j is kept by row i when
  key_first_row[j] <= i < key_end_row[j], where the first row is j's causal start
  (`_key_rows`: only end rows are read). The forward and dq first walk the whole tiles of
  the block's fully kept candidates (listed first by the plan, `full_count`) without that
  test (ALL_KEPT), then the rest.

`_tile_scores` is the one place where a tile's scores and kept mask are computed (SPEC
section 2); the kernels differ only in what they accumulate. The forward and dq hold tiles
as (rows, keys); the dk/dv kernels as (keys, rows) (KEY_MAJOR, one shared step in
`_accumulate_key_grads`), so that their products have the key tile as M dimension. Scores
are float32; softmax runs in base 2 (exp2) with the natural-log lse stored for the SPEC.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453
# How far (natural log) a row's scores may exceed the forward's reference max before the
# reference moves: probabilities stay <= 2^8, far inside float32 and bf16/fp16 range.
RESCALE_MARGIN = tl.constexpr(8 * LN2)


@triton.jit
def _tanh(x):
    # tanh through exp keeps the interpreter and every CUDA arch on one code path.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _per_row(x, KEY_MAJOR: tl.constexpr):
    """A vector over a tile's rows, broadcast along its keys (see `_tile_scores`)."""
    if KEY_MAJOR:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _per_key(x, KEY_MAJOR: tl.constexpr):
    """A vector over a tile's keys, broadcast along its rows."""
    if KEY_MAJOR:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _shared_head(h, hdiv):
    """Head h's index in a tensor shared by groups of `hdiv` heads (key_bias, the plan,
    masks, biases), as int64 for the products with strides. Each kernel takes it once, before
    its key loops, and hands it to the tile helpers: a division inside them is not hoisted
    out of the loops (the compiler may not speculate it), so the dense forward divided
    again in every tile."""
    return (h.to(tl.int32) // hdiv).to(tl.int64)


@triton.jit
def _shared_heads(h, kb_hdiv, ab_hdiv, am_hdiv, plan_hdiv):
    """`_shared_head` of head h for key_bias, attn_bias, attn_mask and the plan."""
    return (_shared_head(h, kb_hdiv), _shared_head(h, ab_hdiv), _shared_head(h, am_hdiv),
            _shared_head(h, plan_hdiv))


@triton.jit
def _key_bias(keys64, key_ok, b, KB, skb_b, skb_h, kb_head, HAS_KB: tl.constexpr):
    """key_bias of some keys, from its head kb_head, in float32 (0 without key_bias or for
    absent keys)."""
    kb = tl.zeros(keys64.shape, tl.float32)
    if HAS_KB:
        kb = tl.load(KB + b * skb_b + kb_head * skb_h + keys64, mask=key_ok,
                     other=0.0).to(tl.float32)
    return kb


@triton.jit
def _key_rows(keys64, key_ok, b, END, splan_b, splan_h, plan_head, causal_offset,
              CAUSAL: tl.constexpr):
    """The rows [first, end) that keep some keys (DMA case; absent keys get end = 0, kept by
    none). Only `end` is read from the plan: a row's threshold never falls as rows see more
    keys, so a key that any row keeps is kept from the first row that sees it, its causal
    start (0 without causality), and a key that no row keeps has end <= that start
    (tests/test_selection.py checks both against the plan's key_first_row)."""
    first = tl.zeros(keys64.shape, tl.int32)
    if CAUSAL:
        first = (keys64 - causal_offset).to(tl.int32)
    end = tl.load(END + b * splan_b + plan_head * splan_h + keys64, mask=key_ok, other=0)
    return first, end


@triton.jit
def _key_terms(
    keys, key_ok, b,
    KB, skb_b, skb_h, kb_head,
    PAD, spad_b,
    END, splan_b, splan_h, plan_head, causal_offset,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_PAD: tl.constexpr,
    INTERVAL: tl.constexpr, ALL_KEPT: tl.constexpr = False,
):
    """A key tile's per-key inputs to `_tile_scores`, loaded once per tile (the dk/dv kernels
    reuse them for every tile of rows): key_bias in float32 (0 without), the rows [first,
    end) that keep each key (INTERVAL, `_key_rows`), and which keys are usable (real and not
    padding; the dense case)."""
    keys64 = keys.to(tl.int64)
    kb = _key_bias(keys64, key_ok, b, KB, skb_b, skb_h, kb_head, HAS_KB)
    first = tl.zeros(keys.shape, tl.int32)
    end = tl.zeros(keys.shape, tl.int32)
    usable = key_ok
    if INTERVAL:
        if not ALL_KEPT:
            first, end = _key_rows(keys64, key_ok, b, END, splan_b, splan_h, plan_head,
                                   causal_offset, CAUSAL)
    elif HAS_PAD:
        usable = key_ok & (tl.load(PAD + b * spad_b + keys64, mask=key_ok, other=0) != 0)
    return kb, first, end, usable


@triton.jit
def _tile_scores(
    qk, rows, keys, kb, first, end, usable, b,
    AB, sab_b, sab_h, sab_r, sab_c, ab_head,
    AM, sam_b, sam_h, sam_r, sam_c, am_head,
    seqlen_q, causal_offset, scale, softcap,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr, HAS_AM: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERVAL: tl.constexpr,
    KEY_MAJOR: tl.constexpr = False, ALL_KEPT: tl.constexpr = False,
    HAS_PAD: tl.constexpr = False,
):
    """Scores s (float32, -inf where not kept) and tanh(t / softcap), from the tile's
    products and its keys' `_key_terms`.
    `qk` is (rows, keys), or (keys, rows) with KEY_MAJOR (the dk/dv kernels, whose tile
    products then have the key tile as their M dimension).
    ALL_KEPT: a tile that is kept whole, so nothing is tested: candidates that the plan lists
    as kept by every row of the block, or (TILE_LIST) a tile of consecutive keys that the
    explicit mask and causality allow whole. There, only key padding and rows past the end
    are left to test, and only when padding or an attn_bias (whose loads must stay in
    bounds) is given; rows past the end are never stored, and the backward's p is 0 there."""
    t = qk * scale
    th = t
    if SOFTCAP:
        th = _tanh(t / softcap)
        t = softcap * th
    row_ids = _per_row(rows, KEY_MAJOR)
    keys64 = keys.to(tl.int64)
    rows64 = rows.to(tl.int64)
    if ALL_KEPT:
        if not INTERVAL and (HAS_PAD or HAS_AB):
            keep = (row_ids < seqlen_q) & _per_key(usable, KEY_MAJOR)
        else:
            keep = tl.full(qk.shape, 1, tl.int1)
    elif INTERVAL:
        # end <= seqlen_q: the interval test alone also keeps rows past the end out.
        keep = ((row_ids >= _per_key(first, KEY_MAJOR))
                & (row_ids < _per_key(end, KEY_MAJOR)))
    else:
        keep = (row_ids < seqlen_q) & _per_key(usable, KEY_MAJOR)
        if CAUSAL:
            keep = keep & (_per_key(keys, KEY_MAJOR) <= row_ids + causal_offset)
        if HAS_AM:
            am_ptr = (AM + b * sam_b + am_head * sam_h
                      + _per_row(rows64, KEY_MAJOR) * sam_r + _per_key(keys64, KEY_MAJOR) * sam_c)
            keep = keep & (tl.load(am_ptr, mask=keep, other=0) != 0)
    if HAS_KB:
        t += _per_key(kb, KEY_MAJOR)
    if HAS_AB:
        ab_ptr = (AB + b * sab_b + ab_head * sab_h + _per_row(rows64, KEY_MAJOR) * sab_r
                  + _per_key(keys64, KEY_MAJOR) * sab_c)
        t += tl.load(ab_ptr, mask=keep, other=0.0).to(tl.float32)
    if ALL_KEPT and (INTERVAL or not (HAS_PAD or HAS_AB)):
        s = t
    else:
        s = tl.where(keep, t, float("-inf"))
    return s, th


@triton.jit
def _gathered_rows(keys, WIDE_OFFSETS: tl.constexpr):
    """Key ids as the forward and dq gather K/V rows with them: int32 offsets (key x row
    stride; fewer address instructions per gathered row) unless the host found that an
    offset may pass 2^31 (WIDE_OFFSETS: int64)."""
    if WIDE_OFFSETS:
        rows = keys.to(tl.int64)
    else:
        rows = keys
    return rows


@triton.jit
def _load_rows(base, rows64, row_stride, dims, row_ok, dim_ok):
    """A (rows, D_PAD) tile of one head's (seq, dim) slice; masked rows and padded dims read 0.
    `rows64` may be any key or row ids (gathered candidates included)."""
    return tl.load(base + rows64[:, None] * row_stride + dims[None, :],
                   mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _key_tile(
    start, block, b, seqlen_k, key_limit,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h, plan_head,
    BLOCK_N: tl.constexpr, INTERVAL: tl.constexpr, TILE_LIST: tl.constexpr = False,
    ALL_KEPT: tl.constexpr = False,
):
    """Key ids of one tile and which of them are real: candidates, the next live tile of
    consecutive keys (TILE_LIST: CAND holds the block's live tile ids), or consecutive keys.
    ALL_KEPT: a tile of the block's fully kept candidates, all of them real."""
    offs = start + tl.arange(0, BLOCK_N)
    if INTERVAL and ALL_KEPT:
        keys = tl.load(CAND + b * scand_b + plan_head * scand_h + block * scand_blk + offs)
        key_ok = tl.full([BLOCK_N], 1, tl.int1)
    elif INTERVAL:
        base = b * scand_b + plan_head * scand_h
        count = tl.load(COUNT + b * scnt_b + plan_head * scnt_h + block)
        key_ok = offs < count
        keys = tl.load(CAND + base + block * scand_blk + offs, mask=key_ok, other=0)
    elif TILE_LIST:
        base = b * scand_b + plan_head * scand_h
        tile = tl.load(CAND + base + block * scand_blk + start // BLOCK_N)
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < seqlen_k
    else:
        key_ok = offs < key_limit
        keys = offs
    return keys, key_ok


@triton.jit
def _tile_count(block, b, seqlen_q, seqlen_k, causal_offset,
                COUNT, scnt_b, scnt_h, plan_head,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, INTERVAL: tl.constexpr,
                TILE_LIST: tl.constexpr = False, BLOCK_N: tl.constexpr = 1):
    """How many key slots a query block walks: its candidate count, its live tiles times
    BLOCK_N, or its causal limit."""
    if INTERVAL:
        n = tl.load(COUNT + b * scnt_b + plan_head * scnt_h + block)
    elif TILE_LIST:
        n = tl.load(COUNT + b * scnt_b + plan_head * scnt_h + block) * BLOCK_N
    else:
        n = seqlen_k
        if CAUSAL:
            last_row = tl.minimum((block + 1) * BLOCK_M, seqlen_q) - 1
            n = tl.maximum(tl.minimum(seqlen_k, last_row + causal_offset + 1), 0)
    return n


@triton.jit
def _full_slots(block, b, FULL, scnt_b, scnt_h, plan_head,
                BLOCK_N: tl.constexpr, INTERVAL: tl.constexpr, TILE_LIST: tl.constexpr):
    """How many of a query block's first key slots form whole tiles kept by every row of the
    block, walked first without the per-pair test: the plan's fully kept candidates rounded
    down to whole tiles, or (TILE_LIST) the live tiles that mask and causality allow whole."""
    n = 0
    if INTERVAL:
        n = tl.load(FULL + b * scnt_b + plan_head * scnt_h + block) // BLOCK_N * BLOCK_N
    elif TILE_LIST:
        n = tl.load(FULL + b * scnt_b + plan_head * scnt_h + block) * BLOCK_N
    return n


@triton.jit
def _row_tile_scores(
    q, start, block, b, hk, rows, dims, dim_ok,
    K, sk_b, sk_s, sk_h, KB, skb_b, skb_h, kb_head,
    AB, sab_b, sab_h, sab_r, sab_c, ab_head,
    AM, sam_b, sam_h, sam_r, sam_c, am_head,
    PAD, spad_b,
    END, splan_b, splan_h, plan_head,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
    seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr,
    HAS_AM: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERVAL: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, ALL_KEPT: tl.constexpr = False,
):
    """The first half of the forward's and dq's step: a query block's scores against one
    key tile (slots start..start + BLOCK_N). Returns the key ids (int32), the same ids as
    `_gathered_rows` gives them (for gathering the V rows), which are real, the tile's K
    rows, and `_tile_scores`' s and tanh."""
    keys, key_ok = _key_tile(start, block, b, seqlen_k, n_slots, CAND, COUNT, scand_b,
                             scand_h, scand_blk, scnt_b, scnt_h, plan_head, BLOCK_N,
                             INTERVAL, TILE_LIST, ALL_KEPT)
    key_rows = _gathered_rows(keys, WIDE_OFFSETS)
    k = _load_rows(K + b * sk_b + hk * sk_h, key_rows, sk_s, dims, key_ok, dim_ok)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    kb, first, end, usable = _key_terms(
        keys, key_ok, b, KB, skb_b, skb_h, kb_head, PAD, spad_b,
        END, splan_b, splan_h, plan_head, causal_offset, CAUSAL, HAS_KB, HAS_PAD, INTERVAL,
        ALL_KEPT)
    s, th = _tile_scores(
        qk, rows, keys, kb, first, end, usable, b,
        AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
        seqlen_q, causal_offset, scale, softcap,
        CAUSAL, HAS_KB, HAS_AB, HAS_AM, SOFTCAP, INTERVAL, ALL_KEPT=ALL_KEPT, HAS_PAD=HAS_PAD)
    return keys, key_rows, key_ok, k, s, th


@triton.jit
def _fwd_tile(
    m_i, l_i, acc, q, start, block, b, hk, rows, dims, dim_ok,
    K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, KB, skb_b, skb_h, kb_head,
    AB, sab_b, sab_h, sab_r, sab_c, ab_head,
    AM, sam_b, sam_h, sam_r, sam_c, am_head,
    PAD, spad_b,
    END, splan_b, splan_h, plan_head,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
    seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr,
    HAS_AM: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERVAL: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, WIDE_OFFSETS: tl.constexpr, ALL_KEPT: tl.constexpr = False,
):
    """One key tile (slots start..start + BLOCK_N) into the forward's online softmax: the
    updated (row max reference m_i, row sums l_i, accumulator acc).

    l_i is (rows, 16): for 16-bit inputs every column holds the row's sum, accumulated by
    the matrix unit (p times a tile of ones, beside p times V: no shuffles across threads
    per tile); float32 inputs add the row sums to column 0 (a float32 product would not run
    on the matrix unit)."""
    keys, key_rows, key_ok, k, s, th = _row_tile_scores(
        q, start, block, b, hk, rows, dims, dim_ok, K, sk_b, sk_s, sk_h,
        KB, skb_b, skb_h, kb_head, AB, sab_b, sab_h, sab_r, sab_c, ab_head,
        AM, sam_b, sam_h, sam_r, sam_c, am_head, PAD, spad_b,
        END, splan_b, splan_h, plan_head,
        CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
        seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
        BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
        DOT_PRECISION, WIDE_OFFSETS, ALL_KEPT)
    m_tile = tl.max(s, 1)
    if LAZY_RESCALE:
        # A row's reference max m_i moves only when the row's max exceeds it by more than
        # RESCALE_MARGIN, so p <= exp(RESCALE_MARGIN), and the (rows x head dim)
        # accumulator is rescaled only in tiles where some row moved (few after the
        # first). Same result: acc / l and lse = m_i + log(l) hold for any reference.
        moved = m_tile > m_i + RESCALE_MARGIN  # false while a row has no kept key
        m_ref = tl.where(moved, m_tile, m_i)
    else:
        m_ref = tl.maximum(m_i, m_tile)
    m_safe = tl.where(m_ref == float("-inf"), 0.0, m_ref)
    # One fused multiply-add per score: s * log2(e) - m * log2(e).
    p = tl.exp2(s * LOG2E - (m_safe * LOG2E)[:, None])
    alpha = tl.exp2((m_i - m_safe) * LOG2E)  # 1 where m_i stays
    v = _load_rows(V + b * sv_b + hk * sv_h, key_rows, sv_s, dims, key_ok, dim_ok)
    if LAZY_RESCALE:
        if tl.max(moved.to(tl.int32), 0) > 0:
            l_i = l_i * alpha[:, None]
            acc = acc * alpha[:, None]
    else:  # every tile rescales (alpha is 1 for rows whose max stayed)
        l_i = l_i * alpha[:, None]
        acc = acc * alpha[:, None]
    p_in = p.to(v.dtype)
    if v.dtype == tl.float32:
        l_i += tl.where(tl.arange(0, 16) == 0, 1.0, 0.0)[None, :] * tl.sum(p, 1)[:, None]
    else:
        l_i = tl.dot(p_in, tl.full([BLOCK_N, 16], 1.0, v.dtype), l_i)
    acc = tl.dot(p_in, v, acc, input_precision=DOT_PRECISION)
    m_i = m_ref
    return m_i, l_i, acc


@triton.jit
def _query_block_tile(heads, group, seqlen_q, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, HEADS_PER_PROG: tl.constexpr):
    """The forward's and dq's program: query block program_id(0) of HEADS_PER_PROG query
    heads of one kv group (program_id(1) over batch x head groups), stacked into one tile.
    Returns (block, b, first head h, kv head hk, each tile row's head and query row, the
    rows as int64, which rows are real, the head dims, which dims are real); b and h are
    int64, since b x batch stride and h x head stride may pass 2^31.

    Blocks run last to first: under causal masking the later blocks hold the most keys, and
    starting the longest programs first leaves the short ones to fill the last wave."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    programs_per_batch = heads // HEADS_PER_PROG
    b = (bh // programs_per_batch).to(tl.int64)
    h = (bh % programs_per_batch).to(tl.int64) * HEADS_PER_PROG
    hk = h // group
    tile = tl.arange(0, HEADS_PER_PROG * BLOCK_M)
    row_head = h + tile // BLOCK_M
    rows = block * BLOCK_M + tile % BLOCK_M
    dims = tl.arange(0, D_PAD)
    return (block, b, h, hk, row_head, rows, rows.to(tl.int64), rows < seqlen_q, dims,
            dims < HEAD_DIM)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h, slse_b, slse_h,
    KB, skb_b, skb_h, kb_hdiv,
    AB, sab_b, sab_h, sab_r, sab_c, ab_hdiv,
    AM, sam_b, sam_h, sam_r, sam_c, am_hdiv,
    PAD, spad_b,
    END, splan_b, splan_h, plan_hdiv,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h, FULL,
    seqlen_q, seqlen_k, causal_offset, heads, group, scale, softcap,
    split_slots, so_split, slse_split,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr, HAS_AM: tl.constexpr,
    HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr, INTERVAL: tl.constexpr,
    TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):
    """One query block of HEADS_PER_PROG query heads of one kv group, stacked into one tile
    so that each gathered K/V tile serves all of them (the host stacks heads only when every
    bias, mask and plan is shared by the group).

    Split keys (decoding): program_id(2) walks only slots [split * split_slots, + split_slots)
    (a multiple of BLOCK_N) and writes its partial output and lse at split * so_split and
    split * slse_split; `_combine_splits_kernel` merges them. Unsplit: one split, all slots."""
    block, b, h, hk, row_head, rows, rows64, row_ok, dims, dim_ok = _query_block_tile(
        heads, group, seqlen_q, HEAD_DIM, D_PAD, BLOCK_M, HEADS_PER_PROG)
    kb_head, ab_head, am_head, plan_head = _shared_heads(h, kb_hdiv, ab_hdiv, am_hdiv,
                                                        plan_hdiv)
    split = tl.program_id(2)
    q = tl.load(Q + b * sq_b + row_head[:, None] * sq_h + rows64[:, None] * sq_s + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([HEADS_PER_PROG * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_PER_PROG * BLOCK_M, 16], tl.float32)  # see _fwd_tile
    acc = tl.zeros([HEADS_PER_PROG * BLOCK_M, D_PAD], tl.float32)
    n_slots = _tile_count(block, b, seqlen_q, seqlen_k, causal_offset, COUNT, scnt_b,
                          scnt_h, plan_head, BLOCK_M, CAUSAL, INTERVAL, TILE_LIST, BLOCK_N)
    slot_lo = split * split_slots
    slot_hi = tl.minimum(n_slots, slot_lo + split_slots)
    if INTERVAL or TILE_LIST:
        # The tiles that every row of the block keeps come first and skip the per-pair test
        # (DMA case: most tiles, the block's few entering and leaving keys come last).
        full_hi = _full_slots(block, b, FULL, scnt_b, scnt_h, plan_head, BLOCK_N, INTERVAL,
                              TILE_LIST)
        full_hi = tl.maximum(tl.minimum(full_hi, slot_hi), slot_lo)
        for start in range(slot_lo, full_hi, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(
                m_i, l_i, acc, q, start, block, b, hk, rows, dims, dim_ok,
                K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, KB, skb_b, skb_h, kb_head,
                AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
                PAD, spad_b, END, splan_b, splan_h, plan_head,
                CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
                seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
                BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
                DOT_PRECISION, LAZY_RESCALE, WIDE_OFFSETS, ALL_KEPT=True)
        slot_lo = full_hi
    for start in range(slot_lo, slot_hi, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(
            m_i, l_i, acc, q, start, block, b, hk, rows, dims, dim_ok,
            K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, KB, skb_b, skb_h, kb_head,
            AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
            PAD, spad_b, END, splan_b, splan_h, plan_head,
            CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
            seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
            BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
            DOT_PRECISION, LAZY_RESCALE, WIDE_OFFSETS)

    l_i = tl.max(l_i, 1)  # the row sums (float32 inputs: column 0, the rest 0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_ptr = (Out + split * so_split + b * so_b + row_head[:, None] * so_h
               + rows64[:, None] * so_s + dims[None, :])
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + split * slse_split + b * slse_b + row_head * slse_h + rows, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    OUT_PARTS, LSE_PARTS, Out, LSE, splits, sp_split, sp_b, sp_s, sp_h, slp_split, slp_b,
    slp_h, so_b, so_s, so_h, slse_b, slse_h, seqlen_q, heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One (batch, row, head) of a split forward: lse = log sum_s exp(lse_s) and
    o = sum_s exp(lse_s - lse) o_s; a row with no kept key in any split stays 0 / -inf."""
    pid = tl.program_id(0)
    b = (pid // (seqlen_q * heads)).to(tl.int64)
    row = (pid // heads) % seqlen_q
    h = (pid % heads).to(tl.int64)
    parts = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, D_PAD)
    part_ok = parts < splits
    lse_parts = tl.load(LSE_PARTS + parts * slp_split + b * slp_b + h * slp_h + row,
                        mask=part_ok, other=float("-inf"))
    top = tl.max(lse_parts, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse_parts - top_safe)  # 0 for empty parts
    total = tl.sum(weight, 0)
    o_parts = tl.load(OUT_PARTS + parts[:, None] * sp_split + b * sp_b + row * sp_s + h * sp_h
                      + dims[None, :], mask=part_ok[:, None] & (dims < HEAD_DIM)[None, :],
                      other=0.0)
    out = tl.sum(o_parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * so_b + row * so_s + h * so_h + dims, out.to(Out.dtype.element_ty),
             mask=dims < HEAD_DIM)
    lse = tl.where(total == 0.0, float("-inf"), top_safe + tl.log(total))
    tl.store(LSE + b * slse_b + h * slse_h + row, lse)


@triton.jit
def _row_delta_kernel(OUT, DOUT, DELTA, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h, seqlen_q, heads,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The backward's first step: delta[b, h, i] = sum_d do[b, i, h, d] * o[b, i, h, d] in
    float32, reading each input once (in torch it takes a cast, a product and a sum)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    b = (tl.program_id(1) // heads).to(tl.int64)
    h = (tl.program_id(1) % heads).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    rows64 = rows.to(tl.int64)
    row_ok = rows < seqlen_q
    ok = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(OUT + b.to(tl.int64) * so_b + h * so_h + rows64[:, None] * so_s + dims[None, :],
                mask=ok, other=0.0)
    do = tl.load(DOUT + b.to(tl.int64) * sdo_b + h * sdo_h + rows64[:, None] * sdo_s
                 + dims[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * heads + h).to(tl.int64) * seqlen_q + rows64, delta, mask=row_ok)


@triton.jit
def _write_bias_grad(ds, DAB, b, row_head, rows64, keys64, row_ok, key_ok,
                     sdab_b, sdab_h, sdab_r, sdab_c, dab_head,
                     REDUCED: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr):
    """A tile's ds into d attn_bias: stored at full size (B, H, Sq, Sk) per query head, or
    (REDUCED) added atomically into attn_bias's own shape (broadcast dims at stride 0),
    summed in registers first over the rows or keys the bias broadcasts (ROWS, KEYS: the
    bias has a row, key dim). Stacked heads share one bias head."""
    if REDUCED:
        base = DAB + b * sdab_b + dab_head * sdab_h
        if ROWS and KEYS:
            tl.atomic_add(base + rows64[:, None] * sdab_r + keys64[None, :] * sdab_c, ds,
                          mask=row_ok[:, None] & key_ok[None, :])
        elif KEYS:
            tl.atomic_add(base + keys64 * sdab_c, tl.sum(ds, 0), mask=key_ok)
        elif ROWS:
            tl.atomic_add(base + rows64 * sdab_r, tl.sum(ds, 1), mask=row_ok)
        else:
            tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))
    else:
        tl.store(DAB + b * sdab_b + row_head[:, None] * sdab_h + rows64[:, None] * sdab_r
                 + keys64[None, :], ds, mask=row_ok[:, None] & key_ok[None, :])


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, start, block, b, hk, row_head, rows, rows64, row_ok, dims, dim_ok,
    K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, DAB, sdab_b, sdab_h, sdab_r, sdab_c, dab_head,
    KB, skb_b, skb_h, kb_head,
    AB, sab_b, sab_h, sab_r, sab_c, ab_head,
    AM, sam_b, sam_h, sam_r, sam_c, am_head,
    PAD, spad_b,
    END, splan_b, splan_h, plan_head,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
    seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr,
    HAS_AM: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERVAL: tl.constexpr, TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_DAB: tl.constexpr, DAB_REDUCED: tl.constexpr, DAB_ROWS: tl.constexpr,
    DAB_KEYS: tl.constexpr, WIDE_OFFSETS: tl.constexpr, ALL_KEPT: tl.constexpr = False,
):
    """One key tile (slots start..start + BLOCK_N) into dq (float32, unscaled), and its ds
    into d attn_bias."""
    keys, key_rows, key_ok, k, s, th = _row_tile_scores(
        q, start, block, b, hk, rows, dims, dim_ok, K, sk_b, sk_s, sk_h,
        KB, skb_b, skb_h, kb_head, AB, sab_b, sab_h, sab_r, sab_c, ab_head,
        AM, sam_b, sam_h, sam_r, sam_c, am_head, PAD, spad_b,
        END, splan_b, splan_h, plan_head,
        CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
        seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
        BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
        DOT_PRECISION, WIDE_OFFSETS, ALL_KEPT)
    v = _load_rows(V + b * sv_b + hk * sv_h, key_rows, sv_s, dims, key_ok, dim_ok)
    p = tl.exp2(s * LOG2E - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if NEED_DAB:
        _write_bias_grad(ds, DAB, b, row_head, rows64, keys.to(tl.int64), row_ok, key_ok,
                         sdab_b, sdab_h, sdab_r, sdab_c, dab_head,
                         DAB_REDUCED, DAB_ROWS, DAB_KEYS)
    dt = ds
    if SOFTCAP:
        dt = ds * (1.0 - th * th)
    dq += tl.dot(dt.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DAB,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, slse_b, slse_h,
    sdab_b, sdab_h, sdab_r, sdab_c, dab_hdiv,
    KB, skb_b, skb_h, kb_hdiv,
    AB, sab_b, sab_h, sab_r, sab_c, ab_hdiv,
    AM, sam_b, sam_h, sam_r, sam_c, am_hdiv,
    PAD, spad_b,
    END, splan_b, splan_h, plan_hdiv,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h, FULL,
    seqlen_q, seqlen_k, causal_offset, heads, group, scale, softcap,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr, HAS_AM: tl.constexpr,
    HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr, INTERVAL: tl.constexpr,
    TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, NEED_DAB: tl.constexpr,
    DAB_REDUCED: tl.constexpr, DAB_ROWS: tl.constexpr, DAB_KEYS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):
    """dq (and ds for d attn_bias, see `_write_bias_grad`) of one query block: the
    forward's walk, with the same head stacking."""
    block, b, h, hk, row_head, rows, rows64, row_ok, dims, dim_ok = _query_block_tile(
        heads, group, seqlen_q, HEAD_DIM, D_PAD, BLOCK_M, HEADS_PER_PROG)
    kb_head, ab_head, am_head, plan_head = _shared_heads(h, kb_hdiv, ab_hdiv, am_hdiv,
                                                        plan_hdiv)
    dab_head = _shared_head(h, dab_hdiv)
    qmask = row_ok[:, None] & dim_ok[None, :]
    q_off = b * sq_b + row_head[:, None] * sq_h + rows64[:, None] * sq_s + dims[None, :]
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    do = tl.load(DO + q_off, mask=qmask, other=0.0)
    stat_off = b * slse_b + row_head * slse_h + rows
    lse = tl.load(LSE + stat_off, mask=row_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
    lse2 = lse * LOG2E  # base 2, so that p costs one multiply-add per score
    delta = tl.load(DELTA + stat_off, mask=row_ok, other=0.0)

    dq = tl.zeros([HEADS_PER_PROG * BLOCK_M, D_PAD], tl.float32)
    n_slots = _tile_count(block, b, seqlen_q, seqlen_k, causal_offset, COUNT, scnt_b,
                          scnt_h, plan_head, BLOCK_M, CAUSAL, INTERVAL, TILE_LIST, BLOCK_N)
    slot_lo = 0
    if INTERVAL or TILE_LIST:  # tiles kept whole first, untested (see _fwd_kernel)
        slot_lo = tl.minimum(_full_slots(block, b, FULL, scnt_b, scnt_h, plan_head, BLOCK_N,
                                         INTERVAL, TILE_LIST), n_slots)
        for start in range(0, slot_lo, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse2, delta, start, block, b, hk, row_head, rows, rows64, row_ok,
                dims, dim_ok, K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, DAB,
                sdab_b, sdab_h, sdab_r, sdab_c, dab_head, KB, skb_b, skb_h, kb_head,
                AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
                PAD, spad_b, END, splan_b, splan_h, plan_head,
                CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
                seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
                BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
                DOT_PRECISION, NEED_DAB, DAB_REDUCED, DAB_ROWS, DAB_KEYS, WIDE_OFFSETS,
                ALL_KEPT=True)
    for start in range(slot_lo, n_slots, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, start, block, b, hk, row_head, rows, rows64, row_ok,
            dims, dim_ok, K, V, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, DAB,
            sdab_b, sdab_h, sdab_r, sdab_c, dab_head, KB, skb_b, skb_h, kb_head,
            AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
            PAD, spad_b, END, splan_b, splan_h, plan_head,
            CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
            seqlen_q, seqlen_k, n_slots, causal_offset, scale, softcap,
            BLOCK_N, CAUSAL, HAS_KB, HAS_AB, HAS_AM, HAS_PAD, SOFTCAP, INTERVAL, TILE_LIST,
            DOT_PRECISION, NEED_DAB, DAB_REDUCED, DAB_ROWS, DAB_KEYS, WIDE_OFFSETS)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _accumulate_key_grads(
    dk, dv, dkb, k, v, Q, DO, LSE, DELTA, sq_b, sq_s, sq_h, slse_b, slse_h,
    rows, keys, kb, first, end, usable, dims, dim_ok, b, h,
    AB, sab_b, sab_h, sab_r, sab_c, ab_head,
    AM, sam_b, sam_h, sam_r, sam_c, am_head,
    seqlen_q, causal_offset, scale, softcap,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr, HAS_AM: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERVAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALL_KEPT: tl.constexpr = False, HAS_PAD: tl.constexpr = False,
):
    """One tile of query rows (of head h) into a key tile's dk, dv (float32, unscaled) and
    d key_bias, given the key tile's `_key_terms`. Key-major: every product has the key
    tile as its M dimension (the tile of rows is only the reduction or N dimension), which
    is what Hopper's warpgroup MMA needs for 64-key tiles when the row tiles are small.
    ALL_KEPT: the tile is kept whole (see `_tile_scores`)."""
    row_ok = rows < seqlen_q
    rows64 = rows.to(tl.int64)
    q_off = b * sq_b + h * sq_h + rows64[:, None] * sq_s + dims[None, :]
    qmask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    do = tl.load(DO + q_off, mask=qmask, other=0.0)
    lse = tl.load(LSE + b * slse_b + h * slse_h + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
    delta = tl.load(DELTA + b * slse_b + h * slse_h + rows, mask=row_ok, other=0.0)
    kq = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (keys, rows)
    s, th = _tile_scores(
        kq, rows, keys, kb, first, end, usable, b,
        AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c, am_head,
        seqlen_q, causal_offset, scale, softcap,
        CAUSAL, HAS_KB, HAS_AB, HAS_AM, SOFTCAP, INTERVAL, KEY_MAJOR=True, ALL_KEPT=ALL_KEPT,
        HAS_PAD=HAS_PAD)
    p = tl.exp2(s * LOG2E - (lse * LOG2E)[None, :])
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[None, :])
    dkb += tl.sum(ds, 1)
    dt = ds
    if SOFTCAP:
        dt = ds * (1.0 - th * th)
    dk = tl.dot(dt.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv, dkb


@triton.jit
def _bwd_dkdv_keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DKB,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, slse_b, slse_h,
    sdk_b, sdk_s, sdk_h, sdkb_b, sdkb_h,
    KB, skb_b, skb_h, kb_hdiv,
    AB, sab_b, sab_h, sab_r, sab_c, ab_hdiv,
    AM, sam_b, sam_h, sam_r, sam_c, am_hdiv,
    PAD, spad_b,
    END, splan_b, splan_h, plan_hdiv,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h, FULL,
    seqlen_q, seqlen_k, causal_offset, kv_heads, group, scale, softcap,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KB: tl.constexpr, HAS_AB: tl.constexpr, HAS_AM: tl.constexpr,
    HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr, INTERVAL: tl.constexpr,
    TILE_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr, NEED_DKB: tl.constexpr,
):
    """dk, dv (and d key_bias per query head) of one tile of consecutive keys, walking the
    query rows that can keep them (TILE_LIST: only the row tiles that CAND lists as live for
    this key tile, those that mask and causality allow whole first, untested).
    Deterministic: every output element has one writer."""
    kblock = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // kv_heads).to(tl.int64)
    hk = (bhk % kv_heads).to(tl.int64)
    keys = kblock * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    key_ok = keys < seqlen_k
    dim_ok = dims < HEAD_DIM
    keys64 = keys.to(tl.int64)
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = _load_rows(K + b * sk_b + hk * sk_h, keys64, sk_s, dims, key_ok,
                       dim_ok)
    v = _load_rows(V + b * sv_b + hk * sv_h, keys64, sv_s, dims, key_ok,
                       dim_ok)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for g in range(0, group):
        h = hk * group + g
        kb_head, ab_head, am_head, plan_head = _shared_heads(h, kb_hdiv, ab_hdiv, am_hdiv,
                                                            plan_hdiv)
        # Rows that may keep a key of this tile.
        if INTERVAL:
            first, end = _key_rows(keys64, key_ok, b, END, splan_b, splan_h, plan_head,
                                   causal_offset, CAUSAL)
            live = key_ok & (end > first)
            row_lo = tl.min(tl.where(live, first, seqlen_q), 0)
            row_hi = tl.max(tl.where(live, end, 0), 0)
        else:
            row_lo = 0
            if CAUSAL:
                row_lo = tl.maximum(kblock * BLOCK_N - causal_offset, 0)
            row_hi = seqlen_q
        row_lo = (row_lo // BLOCK_M) * BLOCK_M
        n_row_tiles = tl.cdiv(row_hi - row_lo, BLOCK_M)
        n_full = 0
        listed = CAND + b * scand_b + plan_head * scand_h + kblock * scand_blk
        kb, first, end, usable = _key_terms(
            keys, key_ok, b, KB, skb_b, skb_h, kb_head, PAD, spad_b,
            END, splan_b, splan_h, plan_head, causal_offset, CAUSAL, HAS_KB, HAS_PAD,
            INTERVAL)
        dkb = tl.zeros([BLOCK_N], tl.float32)
        if TILE_LIST:
            n_row_tiles = tl.load(COUNT + b * scnt_b + plan_head * scnt_h + kblock)
            n_full = tl.load(FULL + b * scnt_b + plan_head * scnt_h + kblock)
            for t in range(0, n_full):  # the row tiles kept whole first, untested
                rows = tl.load(listed + t) * BLOCK_M + tl.arange(0, BLOCK_M)
                dk, dv, dkb = _accumulate_key_grads(
                    dk, dv, dkb, k, v, Q, DO, LSE, DELTA, sq_b, sq_s, sq_h, slse_b, slse_h,
                    rows, keys, kb, first, end, usable, dims, dim_ok, b, h,
                    AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c,
                    am_head, seqlen_q, causal_offset, scale, softcap, CAUSAL, HAS_KB, HAS_AB,
                    HAS_AM, SOFTCAP, INTERVAL, DOT_PRECISION, ALL_KEPT=True, HAS_PAD=HAS_PAD)
        for t in range(n_full, n_row_tiles):
            row_start = row_lo + t * BLOCK_M
            if TILE_LIST:
                row_start = tl.load(listed + t) * BLOCK_M
            rows = row_start + tl.arange(0, BLOCK_M)
            dk, dv, dkb = _accumulate_key_grads(
                dk, dv, dkb, k, v, Q, DO, LSE, DELTA, sq_b, sq_s, sq_h, slse_b, slse_h,
                rows, keys, kb, first, end, usable, dims, dim_ok, b, h,
                AB, sab_b, sab_h, sab_r, sab_c, ab_head, AM, sam_b, sam_h, sam_r, sam_c,
                am_head, seqlen_q, causal_offset, scale, softcap, CAUSAL, HAS_KB, HAS_AB,
                HAS_AM, SOFTCAP, INTERVAL, DOT_PRECISION)
        if NEED_DKB:
            tl.store(DKB + b * sdkb_b + h * sdkb_h + keys64, dkb, mask=key_ok)
    out = b * sdk_b + hk * sdk_h + keys64[:, None] * sdk_s + dims[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dkdv_candidates_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DKB,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, slse_b, slse_h,
    sdk_b, sdk_s, sdk_h, sdkb_b, sdkb_h,
    KB, skb_b, skb_h, kb_hdiv,
    END, splan_b, splan_h, plan_hdiv,
    CAND, COUNT, scand_b, scand_h, scand_blk, scnt_b, scnt_h,
    seqlen_q, seqlen_k, causal_offset, programs_per_batch, heads_per_program, group, key_split,
    scale, softcap,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KB: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NEED_DKB: tl.constexpr,
):
    """DMA case, fast path: dk, dv and d key_bias over the candidate keys of a coarse block of
    ROWS_PER_PROGRAM rows (the union of its rows' kept keys, at most window + rows), added
    atomically (float32) into the gathered key rows. The query heads that share a candidate
    list share each gathered K/V tile, and each key tile only walks the rows of the block that
    its keys' intervals reach; coarse blocks keep the number of atomic adds low."""
    block = tl.program_id(0)
    bp = tl.program_id(1)
    split = tl.program_id(2)
    b = (bp // programs_per_batch).to(tl.int64)
    h0 = (bp % programs_per_batch).to(tl.int64) * heads_per_program
    hk = h0 // group
    plan_head = _shared_head(h0, plan_hdiv)  # one plan for the program's heads
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    row_base = block * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_base + ROWS_PER_PROGRAM, seqlen_q)
    n_slots = tl.load(COUNT + b * scnt_b + plan_head * scnt_h + block)
    for start in range(split * BLOCK_N, n_slots, key_split * BLOCK_N):
        keys, key_ok = _key_tile(start, block, b, seqlen_k, n_slots, CAND, COUNT, scand_b,
                                 scand_h, scand_blk, scnt_b, scnt_h, plan_head, BLOCK_N, True)
        keys64 = keys.to(tl.int64)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = _load_rows(K + b * sk_b + hk * sk_h, keys64, sk_s, dims, key_ok,
                       dim_ok)
        v = _load_rows(V + b * sv_b + hk * sv_h, keys64, sv_s, dims, key_ok,
                       dim_ok)
        # The rows of this block that the tile's key intervals reach.
        first, end = _key_rows(keys64, key_ok, b, END, splan_b, splan_h, plan_head,
                               causal_offset, CAUSAL)
        live = key_ok & (end > first)
        row_lo = tl.maximum(tl.min(tl.where(live, first, seqlen_q), 0), row_base)
        row_hi = tl.minimum(tl.max(tl.where(live, end, 0), 0), row_end)
        row_lo = row_base + ((row_lo - row_base) // BLOCK_M) * BLOCK_M
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for g in range(0, heads_per_program):
            h = h0 + g
            kb_head = _shared_head(h, kb_hdiv)
            # key_bias per head; the row intervals loaded above serve every head (one plan)
            kb = _key_bias(keys64, key_ok, b, KB, skb_b, skb_h, kb_head, HAS_KB)
            dkb = tl.zeros([BLOCK_N], tl.float32)
            for row_start in range(row_lo, row_hi, BLOCK_M):
                rows = row_start + tl.arange(0, BLOCK_M)
                dk, dv, dkb = _accumulate_key_grads(
                    dk, dv, dkb, k, v, Q, DO, LSE, DELTA, sq_b, sq_s, sq_h, slse_b, slse_h,
                    rows, keys, kb, first, end, key_ok, dims, dim_ok, b, h,
                    KB, 0, 0, 0, 0, 0, KB, 0, 0, 0, 0, 0,
                    seqlen_q, causal_offset, scale, softcap,
                    False, HAS_KB, False, False, SOFTCAP, True, DOT_PRECISION)
            if NEED_DKB:
                tl.atomic_add(DKB + b * sdkb_b + h * sdkb_h + keys64, dkb, mask=key_ok)
        out = b * sdk_b + hk * sdk_h + keys64[:, None] * sdk_s + dims[None, :]
        tl.atomic_add(DK + out, dk * scale, mask=kv_mask)
        tl.atomic_add(DV + out, dv, mask=kv_mask)
