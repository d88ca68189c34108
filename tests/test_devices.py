"""Inputs on a CUDA device other than the current one: every kernel of the call runs on the
inputs' device (Triton launches on the current device, and the plan's CUDA graphs follow its
current stream), as where a model's layers are spread over several GPUs."""

import pytest
import torch

import dma
from dma import autograd


def test_the_inputs_device_is_made_current_only_where_it_is_not(monkeypatch):
    entered = []

    class Guard:  # stands in for torch.cuda.device, recording what it was asked
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    with autograd.kernel_context(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        with autograd.kernel_context(device):
            pass
    assert entered == [torch.device("cuda", 1)]
    autocasts = []
    monkeypatch.setattr(autograd, "autocast_dtype", lambda device_type: torch.bfloat16)
    monkeypatch.setattr(torch, "autocast", lambda device_type, enabled: (
        autocasts.append((device_type, enabled)) or Guard(None)))
    with autograd.kernel_context(torch.device("cuda", 1)):  # both guards at once
        pass
    assert entered == [torch.device("cuda", 1), torch.device("cuda", 1), None]
    assert autocasts == [("cuda", False)]


def _call(device, backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 300, 4, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 300, 2, 64, generator=g).to(device, torch.bfloat16)
            .requires_grad_() for _ in range(2))
    key_bias = torch.randn(1, 2, 300, generator=g).to(device, torch.bfloat16).requires_grad_()
    o = dma.attention(q, k, v, key_bias=key_bias, window=64, causal=True, backend=backend)
    o.float().square().sum().backward()
    return [t.detach().cpu() for t in (o, q.grad, k.grad, v.grad, key_bias.grad)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_inputs_on_another_gpu_than_the_current_one(backend, monkeypatch):
    reasons = dma.backends()[backend].reasons(None)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    monkeypatch.setenv("DMA_DETERMINISTIC", "1")  # so that both devices agree bit for bit
    with torch.cuda.device(0):
        expected = _call("cuda:0", backend)
        for _ in range(3):  # the third call replays its plans from CUDA graphs
            got = _call("cuda:1", backend)
            torch.cuda.synchronize(1)
            for want, have in zip(expected, got):
                assert torch.equal(want, have)
