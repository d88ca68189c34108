"""The live-tile lists that let the GPU kernels skip tiles an explicit mask leaves empty,
against a brute-force check of every tile."""

import itertools

import pytest
import torch

from dma.tile_lists import allowed_per_tile, coarser_tiles, live_tile_lists
from dma.validation import validate


def per_tile(pairs, block_m, block_n, reduce):
    """(b, h, row blocks, key tiles): `reduce` (any, all) of each tile's pairs."""
    b, h, sq, sk = pairs.shape
    n_rows, n_keys = -(-sq // block_m), -(-sk // block_n)
    out = torch.zeros(b, h, n_rows, n_keys, dtype=torch.bool)
    for r, k in itertools.product(range(n_rows), range(n_keys)):
        tile = pairs[:, :, r * block_m:(r + 1) * block_m, k * block_n:(k + 1) * block_n]
        out[:, :, r, k] = reduce(tile.flatten(2), -1)
    return out


def random_mask(g, seed, sq, sk):
    """A random mask at one of its broadcast shapes; dense, sparse, or packed documents
    (whose tiles off the diagonal are allowed whole or not at all)."""
    shape = [int(torch.randint(1, 3, (), generator=g)), int(torch.randint(1, 3, (), generator=g)),
             sq if seed % 3 else 1, sk if seed % 4 else 1]
    if seed % 5 == 4:
        docs = int(torch.randint(1, 4, (), generator=g))
        row_doc = torch.arange(shape[2]) * docs // shape[2]
        key_doc = torch.arange(shape[3]) * docs // shape[3]
        return (row_doc[:, None] == key_doc[None, :]).expand(shape).clone()
    density = [0.02, 0.2, 0.9, 1.0][seed % 4]
    return torch.rand(*shape, generator=g) < density


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("by_key", [False, True])
def test_live_tiles_match_brute_force(seed, by_key):
    g = torch.Generator().manual_seed(seed)
    sq, sk = (int(torch.randint(1, 150, (), generator=g)) for _ in range(2))
    causal = bool(seed % 2)
    block_m, block_n = [(16, 16), (64, 32), (32, 64)][seed % 3]
    # Two masks of the same sizes: the second call reuses the tile grid's bounds, which
    # depend on the sizes only, and must still list its own mask's tiles.
    for _ in range(2):
        mask = random_mask(g, seed, sq, sk)
        check_live_tiles(mask, sq, sk, causal, block_m, block_n, by_key)


def check_live_tiles(mask, sq, sk, causal, block_m, block_n, by_key):
    q, k = torch.randn(2, sq, 2, 8), torch.randn(2, sk, 2, 8)
    problem, _ = validate(q, k, k, attn_mask=mask, causal=causal)
    lists = live_tile_lists(problem, allowed_per_tile(mask, block_m, block_n), by_key)
    pairs = mask.expand(*mask.shape[:2], sq, sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq
    # Listed: tiles holding a pair the mask allows and a pair causality allows. That covers
    # every tile holding a pair both allow (the kernels test each pair in the tile anyway).
    listed = (per_tile(pairs, block_m, block_n, torch.any)
              & per_tile(allowed[None, None], block_m, block_n, torch.any))
    assert (per_tile(pairs & allowed, block_m, block_n, torch.any) <= listed).all()
    # Full: both allow every pair of the tile, and the tile's keys are all real.
    whole_keys = (torch.arange(listed.shape[3]) + 1) * block_n <= sk
    full = per_tile(pairs & allowed, block_m, block_n, torch.all) & whole_keys
    if by_key:
        listed, full = listed.transpose(2, 3), full.transpose(2, 3)
    assert torch.equal(lists.counts, listed.sum(-1, dtype=torch.int32))
    assert torch.equal(lists.full_counts, full.sum(-1, dtype=torch.int32))
    for index in itertools.product(*(range(n) for n in listed.shape[:3])):
        # full tiles first, then the other live ones, each ascending
        expected = (full[index].nonzero().flatten().tolist()
                    + (listed[index] & ~full[index]).nonzero().flatten().tolist())
        assert lists.tiles[index][:len(expected)].tolist() == expected


@pytest.mark.parametrize("seed", range(10))
def test_coarser_tiles_list_what_a_pass_over_the_mask_lists(seed):
    # coarser tiles summed from finer counts (dk/dv's 4x wider key tiles from dq's; dq's 2x
    # taller row blocks from dk/dv's; both at once) against their own pass over the mask
    g = torch.Generator().manual_seed(seed)
    sq, sk = (int(torch.randint(1, 300, (), generator=g)) for _ in range(2))
    mask = random_mask(g, seed, sq, sk)
    q, k = torch.randn(2, sq, 2, 8), torch.randn(2, sk, 2, 8)
    problem, _ = validate(q, k, k, attn_mask=mask, causal=bool(seed % 2))
    for fine, coarse in (((64, 16), (64, 64)), ((32, 64), (64, 64)), ((16, 16), (128, 32))):
        summed = coarser_tiles(allowed_per_tile(mask, *fine), *coarse)
        direct = allowed_per_tile(mask, *coarse)
        assert summed._replace(allowed=None) == direct._replace(allowed=None)
        assert torch.equal(summed.allowed, direct.allowed)
        for by_key in (False, True):
            for got, expected in zip(live_tile_lists(problem, summed, by_key),
                                     live_tile_lists(problem, direct, by_key)):
                assert torch.equal(got, expected)


def test_coarser_tiles_refuses_tiles_that_do_not_divide():
    counts = allowed_per_tile(torch.ones(1, 1, 8, 8, dtype=torch.bool), 4, 4)
    with pytest.raises(ValueError, match="not made of"):
        coarser_tiles(counts, 6, 4)
