"""The triton backend's shared-memory fallback (`run_fitting`): a configuration that does not
fit the device steps down, with stand-in launches that raise Triton's OutOfResources."""

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from dma.backends import triton_backend  # noqa: E402
from dma.validation import validate  # noqa: E402


def small_problem():
    q = torch.randn(1, 8, 2, 16)
    return validate(q, q, q, causal=True)[0]


def launcher(fits, calls):
    def run(config):
        calls.append(dict(config))
        if not fits(config):
            raise OutOfResources(200_000, 100_000, "shared memory")
    return run


def test_stages_then_key_tiles_step_down_and_the_fit_is_remembered(monkeypatch):
    monkeypatch.setattr(triton_backend, "_fitted", {})
    problem, calls = small_problem(), []
    config = {"BLOCK_N": 64, "num_stages": 3}
    run = launcher(lambda c: c["num_stages"] == 1 and c["BLOCK_N"] <= 32, calls)
    triton_backend.run_fitting("fwd", problem, config, run)
    assert calls == [{"BLOCK_N": 64, "num_stages": 3}, {"BLOCK_N": 64, "num_stages": 2},
                     {"BLOCK_N": 64, "num_stages": 1}, {"BLOCK_N": 32, "num_stages": 1}]
    calls.clear()
    triton_backend.run_fitting("fwd", problem, config, run)  # the fitted one, at once
    assert calls == [{"BLOCK_N": 32, "num_stages": 1}]


def test_a_configuration_that_fits_runs_unchanged(monkeypatch):
    monkeypatch.setattr(triton_backend, "_fitted", {})
    calls = []
    triton_backend.run_fitting("dq", small_problem(), {"BLOCK_N": 32, "num_stages": 2},
                               launcher(lambda c: True, calls))
    assert calls == [{"BLOCK_N": 32, "num_stages": 2}]


def test_nothing_left_to_shrink_raises(monkeypatch):
    monkeypatch.setattr(triton_backend, "_fitted", {})
    with pytest.raises(OutOfResources):
        triton_backend.run_fitting("dq", small_problem(), {"BLOCK_N": 16, "num_stages": 1},
                                   launcher(lambda c: False, []))
