"""GPU-backend modes that the shared suite does not switch: deterministic backward."""

import pytest
from conformance.cases import CASES

from harness import available_devices, check_case

WINDOW_CASES = [c for c in CASES if c.window is not None and c.attn_bias is None][:8]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c.name for c in WINDOW_CASES])
def test_deterministic_backward(case, backend, device, monkeypatch):
    """DMA_DETERMINISTIC=1 swaps the atomic dk/dv kernel for the key-major one."""
    monkeypatch.setenv("DMA_DETERMINISTIC", "1")
    check_case(case, backend, device)
