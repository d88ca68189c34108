"""Live-tile lists of an explicit mask, shared by the tiled backends (triton, cupy, numba).

An explicit attn_mask (packed documents, say) leaves many tiles of the score matrix empty.
One pass over the mask, at its own broadcast shape, counts each tile's allowed pairs; from
those counts each kernel gets, per block of rows (or per tile of keys), the list of tiles
that hold a pair both the mask and causality allow, those allowed whole first (the kernels
read no mask there). O(tiles) memory beyond the mask itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .validation import Problem


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TileCounts(NamedTuple):
    """Per (mask batch, mask head, block of `block_m` rows, tile of `block_n` keys) how many
    pairs an explicit mask allows, int32, and whether the mask broadcasts its rows or keys
    (a broadcast dim is counted once, so a tile allowed whole counts fewer pairs)."""

    allowed: torch.Tensor  # (B or 1, heads, row blocks or 1, key tiles or 1)
    block_m: int
    block_n: int
    rows_broadcast: bool
    keys_broadcast: bool


def allowed_per_tile(mask: torch.Tensor, block_m: int, block_n: int) -> TileCounts:
    """The one pass over the bool `mask` (B or 1, heads, Sq or 1, Sk or 1) that the tile
    lists need: the pairs it allows per tile, read at its own broadcast shape (never
    broadcast; a mask whose rows are not contiguous is copied once by the reshape)."""
    allowed = mask.view(torch.uint8)
    rows_broadcast, keys_broadcast = allowed.shape[2] == 1, allowed.shape[3] == 1
    if not rows_broadcast:
        # A block sums at most 255 rows in uint8, so the big pass makes no int32 copy.
        allowed = _sum_per_block(allowed, 2, block_m, torch.uint8 if block_m < 256 else
                                 torch.int32)
    allowed = allowed.to(torch.int32)
    if not keys_broadcast:
        allowed = _sum_per_block(allowed, 3, block_n, torch.int32)
    return TileCounts(allowed, block_m, block_n, rows_broadcast, keys_broadcast)


def coarser_tiles(counts: TileCounts, block_m: int, block_n: int) -> TileCounts:
    """`counts` for tiles of `block_m` rows and `block_n` keys, multiples of counts' own:
    each coarse tile sums its fine ones (O(tiles); no pass over the mask)."""
    if block_m % counts.block_m or block_n % counts.block_n:
        raise ValueError(f"tiles of {block_m} x {block_n} are not made of "
                         f"{counts.block_m} x {counts.block_n} tiles")
    allowed = counts.allowed
    if not counts.rows_broadcast and block_m != counts.block_m:
        allowed = _sum_per_block(allowed, 2, block_m // counts.block_m, torch.int32)
    if not counts.keys_broadcast and block_n != counts.block_n:
        allowed = _sum_per_block(allowed, 3, block_n // counts.block_n, torch.int32)
    return counts._replace(allowed=allowed, block_m=block_m, block_n=block_n)


class TileLists(NamedTuple):
    """`live_tile_lists`' result, int32: per (mask batch, mask head, block) the live tiles'
    ids (those that the mask and causality allow whole first, then the rest, each part
    ascending), how many are live, and how many of those are allowed whole."""

    tiles: torch.Tensor
    counts: torch.Tensor
    full_counts: torch.Tensor


def live_tile_lists(problem: Problem, counts: TileCounts, by_key: bool = False) -> TileLists:
    """Per (mask batch, mask head, block of rows), the key tiles that hold a pair the mask
    allows (`counts`, from `allowed_per_tile`) and a pair causality allows (live); with
    `by_key`, per key tile the live row blocks. Every tile with a pair that both allow is
    listed. A live tile is full when both allow every pair of its real rows and its keys
    are all real (none past Sk): the kernels skip the per-pair test there, so full tiles
    are listed first. O(tiles) time and memory."""
    block_m, block_n = counts.block_m, counts.block_n
    shape = _TileShape(problem.seqlen_q, problem.seqlen_k, block_m, block_n,
                       problem.causal_offset if problem.causal else None,
                       counts.rows_broadcast, counts.keys_broadcast, counts.allowed.device)
    bounds = _tile_bounds if _may_cache(shape.device) else _tile_bounds.__wrapped__
    need, causal_live = bounds(shape)
    allowed = counts.allowed.expand(*counts.allowed.shape[:2], *need.shape)
    live = allowed > 0
    if causal_live is not None:
        live = live & causal_live
    full = allowed == need  # need is -1 (never met) where causality or Sk forbid a full tile
    if by_key:
        live, full = live.transpose(2, 3), full.transpose(2, 3)
    rank = live.to(torch.uint8) + full  # 2 full, 1 live, 0 dead
    # A stable sort puts full tiles first, then the other live ones, each in ascending order.
    tiles = torch.sort(rank, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return TileLists(tiles.contiguous(), live.sum(-1, dtype=torch.int32).contiguous(),
                     full.sum(-1, dtype=torch.int32).contiguous())


class _TileShape(NamedTuple):
    """What a tile grid's bounds depend on: the sizes, causality, and the mask's broadcasts
    (not its values)."""

    seqlen_q: int
    seqlen_k: int
    block_m: int
    block_n: int
    causal_offset: Optional[int]  # None without causality
    rows_broadcast: bool
    keys_broadcast: bool
    device: torch.device


@functools.lru_cache(maxsize=8)
def _tile_bounds(shape: _TileShape) -> tuple:
    """(need, causal_live) of a tile grid, both (row blocks, key tiles): how many pairs a
    tile's count must reach to be allowed whole (-1 where it may not be full: a key past Sk,
    or causality forbidding one of its pairs), and the tiles causality leaves a pair in (None
    without causality). They depend on the sizes only, so calls with the same sizes share
    them (about two dozen small launches per list, each costing host time)."""
    n_rows, n_keys = cdiv(shape.seqlen_q, shape.block_m), cdiv(shape.seqlen_k, shape.block_n)
    device = shape.device
    need = torch.ones(n_rows, n_keys, dtype=torch.int32, device=device)
    if not shape.rows_broadcast:
        need = need * _block_lengths(shape.seqlen_q, shape.block_m, device)[:, None]
    if not shape.keys_broadcast:
        need = need * _block_lengths(shape.seqlen_k, shape.block_n, device)[None, :]
    may_be_full = (torch.arange(1, n_keys + 1, device=device) * shape.block_n
                   <= shape.seqlen_k)[None, :]
    causal_live = None
    if shape.causal_offset is not None:
        # Row r allows key j iff j <= r + offset: a tile holds an allowed pair iff its first
        # key <= its last row + offset, and allows all iff its last key <= its first row +
        # offset.
        first_row = torch.arange(n_rows, device=device) * shape.block_m
        last_row = (first_row + shape.block_m).clamp(max=shape.seqlen_q) - 1
        first_key = torch.arange(n_keys, device=device) * shape.block_n
        causal_live = first_key[None, :] <= last_row[:, None] + shape.causal_offset
        may_be_full = may_be_full & (first_key[None, :] + shape.block_n - 1
                                     <= first_row[:, None] + shape.causal_offset)
    return torch.where(may_be_full, need, -1), causal_live


def _may_cache(device: torch.device) -> bool:
    """Whether tensors made now may be kept for later calls: not while a CUDA graph is being
    captured, whose kernels only run when the graph is replayed."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _sum_per_block(t: torch.Tensor, dim: int, block: int, dtype) -> torch.Tensor:
    """`t` summed (in `dtype`) over consecutive blocks of `block` entries along `dim`."""
    size = t.shape[dim]
    full = size // block
    parts = []
    if full:
        whole = t.narrow(dim, 0, full * block)
        parts.append(whole.reshape(*t.shape[:dim], full, block, *t.shape[dim + 1:])
                     .sum(dim + 1, dtype=dtype))
    if size % block:
        parts.append(t.narrow(dim, full * block, size - full * block)
                     .sum(dim, keepdim=True, dtype=dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _block_lengths(size: int, block: int, device) -> torch.Tensor:
    """How many of `size` entries each block of `block` holds (the last may hold fewer)."""
    starts = torch.arange(0, size, block, device=device)
    return (starts + block).clamp(max=size) - starts


class TileCounter:
    """One mask's allowed pairs per tile, counted once: coarser tiles (dq's rows against
    dk/dv's, dk/dv's keys against dq's) sum the finer tiles' counts, so the finest tiles a
    call needs should be asked for first."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # bool or uint8, (B or 1, heads, Sq or 1, Sk or 1)
        self._counted: dict = {}  # (block_m, block_n) -> TileCounts

    def counts(self, block_m: int, block_n: int) -> TileCounts:
        for (rows, keys), counts in self._counted.items():
            if block_m % rows == 0 and block_n % keys == 0:
                return coarser_tiles(counts, block_m, block_n)
        counts = allowed_per_tile(self.mask.view(torch.bool), block_m, block_n)
        self._counted[(block_m, block_n)] = counts
        return counts
