"""Numba dk/dv pass with large key chunks: a block's keys in a chunk exceed one tile product
(SUB_TILE), which the small conformance cases never reach."""

import pytest

from harness import Case, check_case

pytest.importorskip("numba")

CASES = [
    Case("dense_long", batch=1, seqlen_q=300, seqlen_k=320, heads=2, kv_heads=1, head_dim=32),
    Case("window_long", batch=1, seqlen_q=300, seqlen_k=300, heads=2, kv_heads=1, head_dim=32,
         window=200, key_bias=(1, 1)),
    Case("masked_long", batch=1, seqlen_q=200, seqlen_k=260, heads=2, kv_heads=2, head_dim=16,
         attn_bias=(1, 2, 200, 260), key_padding=True, softcap=4.0),
]


@pytest.mark.parametrize("chunk", [64, 1024])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_numba_key_chunks(case, chunk, monkeypatch):
    from dma.backends import numba_backend, numba_kernels

    assert chunk < numba_kernels.SUB_TILE or chunk > 2 * numba_kernels.SUB_TILE
    monkeypatch.setattr(numba_backend, "_key_chunk", lambda problem: chunk)
    check_case(case, "numba", "cpu")
