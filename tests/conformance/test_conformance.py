"""Every registered backend against the float64 reference, on every case and device."""

import pytest

from dma.dispatch import backends
from harness import available_devices, check_case

from .cases import CASES


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(backends()))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance(case, backend, device):
    check_case(case, backend, device)
