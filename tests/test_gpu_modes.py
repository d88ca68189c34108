"""GPU-backend modes that the shared suite does not switch: deterministic backward, the
triton forward's key splits (which it picks on its own only for decoding on a GPU),
run-time tuning, the forward's rescale modes and 64-bit gather offsets; and that d attn_bias
takes the bias's own shape in memory."""

import pytest
import torch
from conformance.cases import CASES

import dma
from dma.backends import gpu_launch, triton_backend, triton_tuning
from harness import available_devices, check_case

WINDOW_CASES = [c for c in CASES if c.window is not None and c.attn_bias is None][:8]
BIAS_CASES = [c for c in CASES if c.name in ("attn_bias_1x1x24x24", "attn_bias_2x2x1x24",
                                             "attn_bias_1x4x24x1", "attn_bias_window_1x2x24x1",
                                             "softcap_attn_bias")]
WIDE_CASES = [c for c in CASES if c.name in ("gqa", "window4", "window_sq1_sk33",
                                             "attn_bias_2x2x24x24", "float16_window",
                                             "float32_window")]
DECODE_CASES = [c for c in CASES if c.seqlen_q == 1]
TUNED_CASES = [c for c in CASES if c.name in ("window4", "key_bias_b1_h1", "attn_bias_2x1x1x1")]
RESCALE_CASES = [c for c in CASES if c.name in ("window4", "long_window", "empty_rows_mask",
                                                "causal_sq1_sk33", "softcap", "float16_masks")]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c.name for c in WINDOW_CASES])
def test_deterministic_backward(case, backend, device, monkeypatch):
    """DMA_DETERMINISTIC=1 swaps the atomic dk/dv kernel for the key-major one."""
    monkeypatch.setenv("DMA_DETERMINISTIC", "1")
    check_case(case, backend, device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("case", BIAS_CASES, ids=[c.name for c in BIAS_CASES])
def test_deterministic_bias_grad(case, backend, device, monkeypatch):
    """In deterministic mode d attn_bias is stored at (B, H, Sq, Sk), one writer per
    element, and reduced after (the default adds into the bias's shape atomically)."""
    monkeypatch.setenv("DMA_DETERMINISTIC", "1")
    check_case(case, backend, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_bias_grad_takes_the_bias_shape(backend):
    # A (1, 1, S, S) bias shared by 16 heads: its gradient buffer is one S x S float32
    # (16 MiB), not one per head (256 MiB).
    heads, seqlen = 16, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, seqlen, heads, 64, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, seqlen, 4, 64, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, seqlen, 4, 64, generator=g, device="cuda").to(torch.bfloat16)
    bias = torch.randn(1, 1, seqlen, seqlen, generator=g, device="cuda").to(torch.bfloat16)
    bias.requires_grad_(True)
    reasons = dma.explain(q, k, v, attn_bias=bias, causal=True)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))
    o = dma.attention(q, k, v, attn_bias=bias, causal=True, backend=backend)
    do = torch.randn(o.shape, generator=g, device="cuda").to(o.dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (grad,) = torch.autograd.grad(o, bias, do)
    extra = torch.cuda.max_memory_allocated() - before
    assert grad.shape == bias.shape and torch.isfinite(grad).all()
    assert extra < 64 * 2**20, f"the backward took {extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.name for c in DECODE_CASES])
def test_triton_split_decoding(case, splits, device, monkeypatch):
    """Key slots split over programs, partial results merged by the combine kernel."""
    monkeypatch.setitem(triton_backend.OVERRIDES, "fwd_decode", {"SPLITS": splits})
    check_case(case, "triton", device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("case", TUNED_CASES, ids=[c.name for c in TUNED_CASES])
def test_triton_autotuned(case, device, monkeypatch):
    """DMA_TRITON_AUTOTUNE=1 runs every alternative on the call's own tensors first: the
    results (gradients added atomically included) must be those of one launch."""
    monkeypatch.setenv("DMA_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_tuning, "_chosen", {})
    check_case(case, "triton", device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("case", RESCALE_CASES, ids=[c.name for c in RESCALE_CASES])
def test_triton_forward_rescale_modes(case, device, monkeypatch):
    """The forward's accumulator rescaled in every tile (LAZY_RESCALE off) and only when a
    row's max moved past the margin (on): the forward configurations each pick one, so each
    is forced here on the other's cases."""
    for kernel in ("fwd", "fwd_dense", "fwd_decode"):
        lazy = not triton_backend.CONFIGS[kernel]["LAZY_RESCALE"]
        monkeypatch.setitem(triton_backend.OVERRIDES, kernel, {"LAZY_RESCALE": lazy})
    check_case(case, "triton", device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("case", WIDE_CASES, ids=[c.name for c in WIDE_CASES])
def test_triton_wide_gather_offsets(case, device, monkeypatch):
    """K/V rows gathered with 64-bit offsets, as tensors past 2^31 elements need them: the
    threshold is lowered to 0 so that these small cases take that path."""
    monkeypatch.setattr(gpu_launch, "INT32_OFFSETS", 0)
    check_case(case, "triton", device)
