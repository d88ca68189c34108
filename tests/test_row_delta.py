"""The backward's first step, delta = rowsum(dO * O): the torch version in chunks of rows,
and the GPU backends' one-kernel versions."""

import pytest
import torch

from dma.backends import base
from dma.backends.torch_backend import TorchBackend
from dma.dispatch import get_backend
from dma.validation import validate
from harness import available_devices


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_row_delta_in_chunks_equals_one_pass(monkeypatch, dtype):
    g = torch.Generator().manual_seed(1)
    b, sq, h, d = 2, 37, 3, 24
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    problem, _ = validate(q, q, q)
    # o as a transposed view (not contiguous), do fresh and random: no zeros, every row.
    o = torch.randn(b, h, sq, d, generator=g).to(dtype).transpose(1, 2)
    do = torch.randn(b, sq, h, d, generator=g).to(dtype)
    expected = torch.einsum("bshd,bshd->bhs", do.double(), o.double())
    # 5 rows per chunk: seven full chunks and a remainder of two.
    monkeypatch.setattr(base, "ROW_DELTA_CHUNK_ELEMENTS", 5 * b * h * d)
    delta = TorchBackend().row_delta(problem, o, do)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert delta.shape == (b, h, sq) and delta.dtype == acc
    torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", [d for d in available_devices() if d != "cpu"])
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [24, 128, 256])
def test_gpu_row_delta_matches_float64(device, backend, dtype, head_dim):
    # The GPU backends' one-kernel row delta, every element against float64 (outputs start
    # as NaN under test), with o a transposed view and do a slice of wider rows.
    g = torch.Generator().manual_seed(head_dim)
    b, sq, h, d = 2, 67, 3, head_dim
    q = torch.randn(b, sq, h, d, generator=g).to(dtype).to(device)
    problem, _ = validate(q, q, q)
    reasons = get_backend(backend).reasons(problem)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    o = torch.randn(b, h, sq, d, generator=g).to(dtype).to(device).transpose(1, 2)
    do = torch.randn(b, sq, h, d + 8, generator=g).to(dtype).to(device)[..., :d]
    expected = torch.einsum("bshd,bshd->bhs", do.double(), o.double())
    delta = get_backend(backend).row_delta(problem, o, do)
    assert delta.shape == (b, h, sq) and delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-4)
