"""The model layer: key scores and DynamicMaskAttention against float64 compositions."""

import math

import pytest
import torch
import torch.nn.functional as F

import dma
from reference import reference_attention


@pytest.mark.parametrize("form", ["softplus", "exp"])
def test_key_scores_gradients_float64(form):
    torch.manual_seed(0)
    b, s, hkv, d = 2, 7, 3, 4
    v = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(hkv, hkv * d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(hkv, dtype=torch.float64, requires_grad=True)
    a = torch.randn(hkv, dtype=torch.float64, requires_grad=True) * 0.3
    a = a.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: dma.key_scores(*t, form=form), (v, w, bias, a))
    out = dma.key_scores(v, w, bias, a, form=form)
    z = torch.einsum("bsf,hf->bhs", v.reshape(b, s, -1), w) + bias[None, :, None]
    expected = a[None, :, None] * torch.log1p(torch.exp(z))
    if form == "exp":
        expected = torch.exp(expected)
    torch.testing.assert_close(out, expected)


def test_key_scores_bad_input():
    v = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="proj_weight"):
        dma.key_scores(v, torch.randn(2, 7), None, torch.zeros(2))
    with pytest.raises(ValueError, match="form"):
        dma.key_scores(v, torch.randn(2, 8), None, torch.zeros(2), form="relu")


def make_layer(**kw):
    torch.manual_seed(0)
    layer = dma.nn.DynamicMaskAttention(32, num_heads=4, num_kv_heads=2, window=6, **kw)
    with torch.no_grad():
        layer.A.fill_(0.7)  # away from the sliding-window start so every parameter matters
    return layer


def test_module_shapes_and_gradients_reach_every_parameter():
    layer = make_layer()
    x = torch.randn(2, 20, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient signal reached {name}"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_module_matches_float64_composition():
    layer = make_layer().double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    got = layer(x)
    b, s, _ = x.shape
    q = (x @ layer.q_proj.weight.T).view(b, s, 4, 8)
    k = (x @ layer.k_proj.weight.T).view(b, s, 2, 8)
    v = (x @ layer.v_proj.weight.T).view(b, s, 2, 8)
    pos = torch.arange(s, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    ang = pos[:, None] * inv[None, :]

    def rope(t):
        t1, t2 = t[..., 0::2], t[..., 1::2]
        c, sn = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        return torch.stack((t1 * c - t2 * sn, t1 * sn + t2 * c), -1).flatten(-2)

    z = v.reshape(b, s, 16) @ layer.score_proj.weight.T + layer.score_proj.bias
    kb = (layer.A * F.softplus(z)).transpose(1, 2)
    o, _ = reference_attention(rope(q), rope(k), v, key_bias=kb, window=6, causal=True,
                               scale=1 / math.sqrt(8))
    expected = o.reshape(b, s, 32) @ layer.o_proj.weight.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_A_is_sliding_window():
    layer = make_layer(rope=False)
    with torch.no_grad():
        layer.A.zero_()
    x = torch.randn(1, 24, 32)
    y = layer(x)
    q, k, v, _ = layer.project(x, torch.arange(24))
    i, j = torch.arange(24)[:, None], torch.arange(24)[None, :]
    band = ((j <= i) & (j > i - 6))[None, None]
    o = dma.attention(q, k, v, attn_mask=band)
    torch.testing.assert_close(y, layer.o_proj(o.reshape(1, 24, 32)))


@pytest.mark.parametrize("backend", ["torch", "numba", "triton", "cupy"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_decoding_matches_full_forward_with_bounded_cache(backend, chunk):
    reasons = dma.backends()[backend].reasons(None)
    if reasons:
        pytest.skip(f"{backend} unavailable: {reasons}")
    device = "cuda" if backend in ("triton", "cupy") and torch.cuda.is_available() else "cpu"
    layer = make_layer(backend=backend).to(device)
    torch.manual_seed(1)
    x = torch.randn(2, 23, 32, device=device)
    full = layer(x)
    cache = dma.nn.DecodeCache(layer.window)
    outputs = []
    for start in range(0, x.shape[1], chunk):
        if device == "cuda":  # a step queues its work: any host sync in it raises
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            outputs.append(layer.step(x[:, start:start + chunk], cache))
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert cache.length == min(start + chunk, x.shape[1])
        assert cache.size <= layer.window  # memory does not grow with the tokens decoded
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == x.shape[1]
