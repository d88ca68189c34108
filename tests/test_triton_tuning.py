"""The run-time tuner's choice logic (dma/backends/triton_tuning.py), with stand-in trials;
the triton suites run it on the real kernels (tests/test_gpu_modes.py)."""

import time

import pytest
import torch

from dma.backends import triton_tuning


@pytest.fixture
def tuning(monkeypatch):
    monkeypatch.setenv("DMA_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_tuning, "_chosen", {})
    monkeypatch.setitem(triton_tuning.SEARCH, "toy", {"BLOCK_N": [16, 32, 64], "num_warps": [8]})


def sleeping_trial(seconds_by_block, calls, fail=()):
    def trial(config):
        calls.append(dict(config))
        if config["BLOCK_N"] in fail:
            raise RuntimeError("out of resources")
        time.sleep(seconds_by_block[config["BLOCK_N"]] * (2 if config["num_warps"] == 8 else 1))
    return trial


def test_the_fastest_alternative_is_chosen_once_per_key(tuning):
    calls = []
    trial = sleeping_trial({16: 0.03, 32: 0.001, 64: 0.02}, calls, fail=(64,))
    default = {"BLOCK_N": 16, "num_warps": 4}
    cpu = torch.device("cpu")
    chosen = triton_tuning.choose("toy", ("k",), default, trial, cpu)
    assert chosen == {"BLOCK_N": 32, "num_warps": 4}
    tried = {(c["BLOCK_N"], c["num_warps"]) for c in calls}
    assert tried == {(16, 4), (32, 4), (64, 4), (16, 8)}  # one setting varied at a time
    calls.clear()
    assert triton_tuning.choose("toy", ("k",), default, trial, cpu) == chosen
    assert not calls  # cached for the key


def test_untuned_kernels_and_tuning_off_keep_the_default(tuning, monkeypatch):
    def trial(config):
        raise AssertionError("no trial expected")

    default = {"BLOCK_N": 16, "num_warps": 4}
    cpu = torch.device("cpu")
    assert triton_tuning.choose("fwd_decode", ("k",), default, trial, cpu) == default
    monkeypatch.setenv("DMA_TRITON_AUTOTUNE", "0")
    assert triton_tuning.choose("toy", ("k",), default, trial, cpu) == default


def test_lengths_share_a_key_within_a_power_of_two():
    class P:
        dtype, group_size, window = torch.float16, 4, 2048

        def __init__(self, sq, sk):
            self.seqlen_q, self.seqlen_k = sq, sk

    flags = {"CAUSAL": True}
    key = triton_tuning.tuning_key
    assert key("fwd", P(9000, 9000), flags, 128) == key("fwd", P(16384, 16384), flags, 128)
    assert key("fwd", P(8192, 8192), flags, 128) != key("fwd", P(8193, 8193), flags, 128)
    assert key("fwd", P(1, 4096), flags, 128) != key("fwd", P(4096, 4096), flags, 128)
