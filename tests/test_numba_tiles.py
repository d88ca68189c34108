"""Numba paths the small conformance cases do not reach: dk/dv key chunks larger than one
tile product (SUB_TILE), the two-pass backward (deterministic mode), packed documents long
enough for tiles that the mask allows whole, the scipy BLAS fallback and the gemm wrapper
itself."""

import numpy as np
import pytest

from harness import Case, check_case, make_inputs

pytest.importorskip("numba")

CASES = [
    Case("dense_long", batch=1, seqlen_q=300, seqlen_k=320, heads=2, kv_heads=1, head_dim=32),
    Case("window_long", batch=1, seqlen_q=300, seqlen_k=300, heads=2, kv_heads=1, head_dim=32,
         window=200, key_bias=(1, 1)),
    Case("masked_long", batch=1, seqlen_q=200, seqlen_k=260, heads=2, kv_heads=2, head_dim=16,
         attn_bias=(1, 2, 200, 260), key_padding=True, softcap=4.0),
    # Documents of 300 tokens, so boundaries fall inside tiles: the forward's 64 x 128 tiles
    # and dk/dv's key chunks hold tiles that the mask and causality allow whole (walked
    # without reading the mask) beside tiles that need the per-pair test.
    Case("packed_documents_long", batch=1, seqlen_q=600, seqlen_k=600, heads=2, kv_heads=1,
         head_dim=32, attn_mask=(1, 1, 600, 600), mask_documents=2),
    Case("packed_documents_bias_long", batch=1, seqlen_q=600, seqlen_k=600, heads=2,
         kv_heads=1, head_dim=32, attn_mask=(1, 1, 600, 600), mask_documents=2,
         attn_bias=(1, 2, 600, 600), key_padding=True),
]


@pytest.mark.parametrize("chunk", [64, 1024])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_numba_key_chunks(case, chunk, monkeypatch):
    from dma.backends import numba_backend, numba_kernels

    assert chunk < numba_kernels.SUB_TILE or chunk > 2 * numba_kernels.SUB_TILE
    monkeypatch.setattr(numba_backend, "_key_chunk", lambda problem: chunk)
    check_case(case, "numba", "cpu")


@pytest.mark.parametrize("by_key, keys", [(False, 128), (True, 64)])
def test_packed_documents_long_hold_whole_tiles(by_key, keys):
    # The long packed-document cases above must reach the whole-tile path of every kernel
    # (forward and dq: 128-key tiles; dk/dv: 64-key chunks; the 1024-key chunk spans both
    # documents, so it has none).
    from dma.backends import numba_backend
    from dma.tile_lists import allowed_per_tile, live_tile_lists
    from dma.validation import validate

    case = next(c for c in CASES if c.name == "packed_documents_long")
    tensors, _, _ = make_inputs(case, "cpu")
    mask = tensors["attn_mask"]
    problem, _ = validate(tensors["q"], tensors["k"], tensors["v"], attn_mask=mask,
                          causal=case.causal)
    counts = allowed_per_tile(mask, numba_backend.BLOCK_M, keys)
    assert live_tile_lists(problem, counts, by_key).full_counts.sum() > 0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_numba_two_pass_backward(case, monkeypatch):
    """Deterministic mode: dq from its own pass over query blocks (d attn_bias there too)."""
    from dma.backends import numba_backend

    monkeypatch.setenv("DMA_DETERMINISTIC", "1")
    assert not numba_backend._one_pass_backward(np.zeros((1, 1, 1, 1), np.float32))
    check_case(case, "numba", "cpu")


@pytest.fixture
def scipy_blas(monkeypatch):
    """The kernels' gemm taken from scipy's BLAS, as on torch builds without MKL."""
    from dma.backends import numba_blas

    numba_blas.gemm_function.cache_clear()
    monkeypatch.setattr(numba_blas, "_torch_mkl", lambda: None)
    yield
    numba_blas.gemm_function.cache_clear()


def test_numba_scipy_blas(scipy_blas):
    from dma.backends import numba_blas

    assert numba_blas.blas_name() == "scipy's BLAS"
    check_case(CASES[1], "numba", "cpu")


@pytest.mark.parametrize("source", ["default", "scipy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_matches_numpy(dtype, source, request):
    """Every transpose combination, with and without accumulation, on row-contiguous views
    whose row stride exceeds their width."""
    from numba import njit

    from dma.backends import numba_blas

    if source == "scipy":
        request.getfixturevalue("scipy_blas")
    gemm = numba_blas.gemm_function(dtype)

    @njit
    def call(gemm, a, ta, b, tb, out, accumulate):
        numba_blas.matmul(gemm, a, ta, b, tb, out, accumulate)

    rng = np.random.default_rng(0)

    def view(rows, cols):  # rows of a wider array: row stride 11 elements
        return rng.standard_normal((12, 11)).astype(dtype)[:rows, :cols]

    m, n, k = 5, 7, 3
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for ta in (False, True):
        for tb in (False, True):
            for accumulate in (False, True):
                a = view(k, m) if ta else view(m, k)
                b = view(n, k) if tb else view(k, n)
                out_wide = rng.standard_normal((m, 9)).astype(dtype)
                untouched = out_wide[:, n:].copy()
                out = out_wide[:, :n]
                expected = (a.T if ta else a) @ (b.T if tb else b) + (out if accumulate else 0)
                call(gemm, a, ta, b, tb, out, accumulate)
                np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
                np.testing.assert_array_equal(out_wide[:, n:], untouched)


def test_numba_deterministic_mode_repeats_bitwise(monkeypatch):
    """Deterministic mode promises the same bits on every run, dq included."""
    import torch

    import dma

    monkeypatch.setenv("DMA_DETERMINISTIC", "1")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 300, 4, 32, generator=g, requires_grad=True) for _ in range(3))
    kb = torch.randn(1, 4, 300, generator=g, requires_grad=True)
    upstream = torch.randn(1, 300, 4, 32, generator=g)
    runs = []
    for _ in range(3):
        for t in (q, k, v, kb):
            t.grad = None
        out = dma.attention(q, k, v, key_bias=kb, window=64, causal=True, backend="numba")
        out.backward(upstream)
        runs.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v, kb)])
    for later in runs[1:]:
        for first, again in zip(runs[0], later):
            assert torch.equal(first, again)
