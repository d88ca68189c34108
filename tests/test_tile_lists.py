"""The live-tile lists that let the GPU kernels skip tiles an explicit mask leaves empty,
against a brute-force check of every tile."""

import itertools

import pytest
import torch

from dma.backends.gpu_launch import live_tile_lists
from dma.validation import validate


def tiles_with(pairs, block_m, block_n):
    """(b, h, row blocks, key tiles): whether each tile holds a True pair."""
    b, h, sq, sk = pairs.shape
    n_rows, n_keys = -(-sq // block_m), -(-sk // block_n)
    live = torch.zeros(b, h, n_rows, n_keys, dtype=torch.bool)
    for r, k in itertools.product(range(n_rows), range(n_keys)):
        tile = pairs[:, :, r * block_m:(r + 1) * block_m, k * block_n:(k + 1) * block_n]
        live[:, :, r, k] = tile.flatten(2).any(-1)
    return live


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("by_key", [False, True])
def test_live_tiles_match_brute_force(seed, by_key):
    g = torch.Generator().manual_seed(seed)
    sq, sk = (int(torch.randint(1, 70, (), generator=g)) for _ in range(2))
    shape = [int(torch.randint(1, 3, (), generator=g)), int(torch.randint(1, 3, (), generator=g)),
             sq if seed % 3 else 1, sk if seed % 4 else 1]
    density = [0.02, 0.2, 0.9][seed % 3]
    mask = torch.rand(*shape, generator=g) < density
    causal = bool(seed % 2)
    block_m, block_n = [(16, 16), (64, 32), (32, 64)][seed % 3]
    q, k = torch.randn(2, sq, 2, 8), torch.randn(2, sk, 2, 8)
    problem, _ = validate(q, k, k, attn_mask=mask, causal=causal)
    tiles, counts = live_tile_lists(problem, mask, block_m, block_n, by_key)
    full = mask.expand(*mask.shape[:2], sq, sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq
    # Listed: tiles holding a pair the mask allows and a pair causality allows. That covers
    # every tile holding a pair both allow (the kernels test each pair in the tile anyway).
    listed = tiles_with(full, block_m, block_n) & tiles_with(allowed[None, None], block_m,
                                                             block_n)
    assert (tiles_with(full & allowed, block_m, block_n) <= listed).all()
    if by_key:
        listed = listed.transpose(2, 3)
    assert torch.equal(counts, listed.sum(-1, dtype=torch.int32))
    for index in itertools.product(*(range(n) for n in listed.shape[:3])):
        expected = listed[index].nonzero().flatten().tolist()
        assert tiles[index][:len(expected)].tolist() == expected
