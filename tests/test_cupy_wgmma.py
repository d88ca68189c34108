"""The cupy backend's warpgroup kernels (Hopper only, sm_90a: the forward, dq and dk/dv): every
conformance case again in the shapes they serve, 16-bit types at head dims 64 and 128,
against the float64 reference. The conformance suite's own cases are float32 or head dim
16, which take the mma.sync kernels."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import CASES

from dma.backends import cupy_backend, cupy_kernels
from harness import Case, check_case

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
    reason="the warpgroup kernels need a GPU of compute capability 9.0")

# bfloat16 at head dim 128 (the benchmark shape) and float16 at 64: both element types and
# both head dims, every feature of the suite.
SHAPES = ((torch.bfloat16, 128), (torch.float16, 64))
WGMMA_CASES = [case.with_(name=f"{case.name}_{str(dtype)[6:]}_d{d}", dtype=dtype, head_dim=d)
               for dtype, d in SHAPES for case in CASES if case.dtype == torch.float32]


# Enough candidate keys per query block for the kernels' steady state, which the suite's
# cases (at most four forward tiles) do not reach: up to 828 candidates, 7 forward tiles of
# 128 keys (the copies and key fetches run several tiles ahead), 13 dq tiles of 64 (its
# three K/V buffers in rotation), with and without a softcap.
MANY_TILES = [Case(f"many_tiles_{str(dtype)[6:]}_d{d}{'_softcap' if softcap else ''}",
                   batch=1, seqlen_q=1100, seqlen_k=1100, heads=4, kv_heads=2, head_dim=d,
                   dtype=dtype, window=700, key_bias=(1, 2), softcap=softcap, seed=3)
              for dtype, d in SHAPES for softcap in (None, 5.0)]


@pytest.mark.parametrize("case", WGMMA_CASES + MANY_TILES,
                         ids=[c.name for c in WGMMA_CASES + MANY_TILES])
def test_warpgroup_kernels_conformance(case):
    check_case(case, "cupy", "cuda")


def test_the_cases_reach_the_warpgroup_kernels(monkeypatch):
    launched = []
    launch = cupy_kernels.launch

    def recording(kernel, *args):
        launched.append(kernel)
        return launch(kernel, *args)

    monkeypatch.setattr(cupy_kernels, "launch", recording)
    monkeypatch.delenv("DMA_CUPY_WGMMA", raising=False)
    for case in [c for c in WGMMA_CASES if c.name.startswith("base_")]:  # one per shape
        check_case(case, "cupy", "cuda")
    for kernel, wgmma in cupy_kernels.WGMMA_KERNELS.items():
        assert launched.count(wgmma) >= 2 and kernel not in launched
    assert cupy_backend.BLOCK_M == cupy_kernels.tiles(cupy_kernels.WGMMA_FORWARD,
                                                      torch.bfloat16, 128)[0]
