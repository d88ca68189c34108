"""Under torch.autocast, dma.attention takes its inputs as SDPA does (docs/semantics.md):
floating inputs in autocast's dtype, the output in that dtype, gradients back in each
input's own dtype, and the kernels and torch ops inside unaffected by autocast."""

import pytest
import torch

import dma
from harness import available_devices

AUTOCAST = torch.bfloat16


def _leaves(device, dtype=torch.float32, seed=0):
    """q, k, v, key_bias, attn_bias on fresh random values, wanting gradients."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 40, 4, 16), (2, 48, 2, 16), (2, 48, 2, 16), (2, 2, 48), (1, 4, 40, 48)]
    return [torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def _run(leaves, backend):
    q, k, v, key_bias, attn_bias = leaves
    o = dma.attention(q, k, v, key_bias=key_bias, attn_bias=attn_bias, window=10, causal=True,
                      backend=backend)
    return o


def _loss(o):
    return (o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum()


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(dma.backends()))
def test_autocast_runs_the_call_in_its_dtype(backend, device, monkeypatch):
    monkeypatch.setenv("DMA_DETERMINISTIC", "1")  # so that both routes agree bit for bit
    # The Triton interpreter cannot load bfloat16: float16 there.
    dtype = torch.float16 if (backend, device) == ("triton", "cpu") else AUTOCAST
    leaves = _leaves(device)
    cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
    reasons = dma.explain(*cast[:3], key_bias=cast[3], attn_bias=cast[4], window=10,
                          causal=True)[backend]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    with torch.autocast(device, dtype=dtype):
        o = _run(leaves, backend)
        _loss(o).backward()  # backward inside the context too: the kernels ignore it
    expected = _run(cast, backend)
    _loss(expected).backward()
    assert o.dtype == dtype
    assert torch.equal(o, expected)
    for leaf, by_hand in zip(leaves, cast):
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, by_hand.grad.float())


def test_inputs_autocast_leaves_alone():
    """float64 inputs stay float64 (autocast casts only 16- and 32-bit floats); without
    autocast nothing is cast."""
    leaves = _leaves("cpu", torch.float64)
    with torch.autocast("cpu", dtype=AUTOCAST):
        assert _run(leaves, "torch").dtype == torch.float64
    assert _run(_leaves("cpu"), "torch").dtype == torch.float32
    with torch.autocast("cpu", dtype=AUTOCAST, enabled=False):
        assert _run(_leaves("cpu"), "torch").dtype == torch.float32


def test_autocast_still_reports_bad_input():
    q, k, v, _, _ = _leaves("cpu")
    with torch.autocast("cpu", dtype=AUTOCAST):
        with pytest.raises(TypeError, match="key_bias"):
            dma.attention(q, k, v, key_bias=[0.0] * 48, window=4)
        with pytest.raises(TypeError, match="k must have q's dtype"):
            dma.attention(q, k.detach().double(), v, window=4)
