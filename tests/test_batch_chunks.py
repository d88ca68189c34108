"""Calls whose batch x heads exceeds what a CUDA grid holds run as calls on batch chunks
(dma/api.py); here the limit is lowered and applied to CPU tensors to check the split."""

import pytest
import torch

import dma
from dma import api, autograd


def _inputs(seed=0):
    """Batch 5 over 4 query heads, with inputs whose batch dim is B and ones that broadcast."""
    g = torch.Generator().manual_seed(seed)
    b, sq, sk, h, hkv, d = 5, 20, 24, 4, 2, 16
    tensors = dict(
        q=torch.randn(b, sq, h, d, generator=g), k=torch.randn(b, sk, hkv, d, generator=g),
        v=torch.randn(b, sk, hkv, d, generator=g), key_bias=torch.randn(1, hkv, sk, generator=g),
        attn_bias=torch.randn(b, 1, sq, sk, generator=g))
    for t in tensors.values():
        t.requires_grad_()
    masks = dict(attn_mask=torch.rand(1, h, sq, sk, generator=g) > 0.2,
                 key_padding_mask=torch.rand(b, sk, generator=g) > 0.1)
    return tensors, masks


def _call(tensors, masks, backend):
    o, lse = dma.attention(**tensors, **masks, window=6, causal=True, return_lse=True,
                           backend=backend)
    loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + torch.nan_to_num(lse).sum()
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return [o, lse, *grads]


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_call_split_into_batch_chunks_gives_the_whole_calls_result(backend, monkeypatch):
    if dma.backends()[backend].reasons(None):
        pytest.skip(f"{backend} unavailable here")
    tensors, masks = _inputs()
    expected = _call(tensors, masks, backend)
    batches = []
    run = autograd.run
    monkeypatch.setattr(autograd, "run", lambda problem, *rest: (
        batches.append(problem.batch) or run(problem, *rest)))
    monkeypatch.setattr(api, "GRID_LIMITED_DEVICES", ("cpu",))
    monkeypatch.setattr(api, "MAX_GPU_BATCH_HEADS", 8)  # 2 batch entries of 4 heads a call
    got = _call(tensors, masks, backend)
    assert batches == [2, 2, 1]
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_small_calls_and_other_devices_are_not_split():
    q = torch.randn(3, 4, 4, 8)
    assert api._batch_chunk(q) is None  # a CPU tensor
    assert api._batch_chunk(torch.randn(1, 4, 70000, 8)) is None  # one batch entry


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_decoding_more_sequences_than_a_grid_holds(backend):
    """2100 sequences x 32 heads = 67200 programs along y: beyond one grid."""
    if dma.backends()[backend].reasons(None):
        pytest.skip(f"{backend} unavailable here")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2100, 1, 32, 64, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2100, 80, 8, 64, generator=g).to("cuda", torch.bfloat16)
            for _ in range(2))
    key_bias = torch.randn(2100, 8, 80, generator=g).to("cuda", torch.bfloat16)
    options = dict(key_bias=key_bias, window=16, causal=True)
    got = dma.attention(q, k, v, **options, backend=backend)
    expected = dma.attention(q.double(), k.double(), v.double(),
                             **dict(options, key_bias=key_bias.double()), backend="torch")
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
