"""The backward's first step, delta = rowsum(dO * O), computed in chunks of rows."""

import pytest
import torch

from dma.backends import base
from dma.backends.torch_backend import TorchBackend
from dma.validation import validate


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
