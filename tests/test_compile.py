"""torch.compile(fullgraph=True) traces a model that calls dma.attention (custom-op route)."""

import pytest
import torch

import dma
from harness import available_devices


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("window", [None, 8])
def test_fullgraph_compile_matches_eager(device, window):
    torch.manual_seed(0)
    b, s, h, hkv, d = 1, 64, 4, 2, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(b, s, n, d, device=device, dtype=dtype, requires_grad=True)
               for n in (h, hkv, hkv))
    kb = torch.randn(b, hkv, s, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, d, device=device, dtype=dtype)

    def model(q, k, v, kb):
        o, lse = dma.attention(q @ w, k, v, key_bias=kb, window=window, causal=True,
                               return_lse=True)
        return (o.float().square().sum() + lse.float().exp().sum())

    compiled = torch.compile(model, fullgraph=True)
    eager_loss = model(q, k, v, kb)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, kb))
    loss = compiled(q, k, v, kb)
    grads = torch.autograd.grad(loss, (q, k, v, kb))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, eager_grads):
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", available_devices())
def test_fullgraph_compile_under_autocast(device):
    """The autocast casts (api.py) trace too: float32 inputs, bfloat16 output, as eagerly."""
    torch.manual_seed(0)
    q = torch.randn(1, 48, 4, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 48, 2, 16, device=device, requires_grad=True) for _ in range(2))
    kb = torch.randn(1, 2, 48, device=device, requires_grad=True)

    def model(q, k, v, kb):
        return dma.attention(q, k, v, key_bias=kb, window=8, causal=True)

    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, want = compiled(q, k, v, kb), model(q, k, v, kb)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = torch.autograd.grad(got.float().sum(), (q, k, v, kb))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
