"""-inf in key_bias or attn_bias (an additive mask): such a key contributes nothing, and a row
whose kept keys all score -inf is answered as a row with no kept key (o = 0, lse = -inf, no
gradient) where the plain formula would give NaN (docs/semantics.md)."""

import pytest
import torch

import dma
from harness import available_devices
from reference import reference_attention

B, S, H, HKV, D = 2, 40, 4, 2, 16


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, n, D, generator=g) for n in (H, HKV, HKV))
    key_bias = torch.randn(B, HKV, S, generator=g)
    key_bias[:, :, ::3] = float("-inf")  # every third key masked by its score
    key_bias[1, 1] = float("-inf")  # batch 1, kv head 1: every key
    attn_bias = torch.randn(B, 1, S, S, generator=g)
    attn_bias[:, :, 5:9] = float("-inf")  # rows 5 to 8: every key
    attn_bias[:, :, :, 20:30] = float("-inf")
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, key_bias, attn_bias)]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(dma.backends()))
@pytest.mark.parametrize("window", [None, 6])
def test_rows_whose_kept_keys_all_score_minus_infinity_are_empty(window, backend, device):
    dtype = torch.float32
    leaves = _inputs(device, dtype)
    q, k, v, key_bias, attn_bias = leaves
    options = dict(key_bias=key_bias, attn_bias=attn_bias, window=window, causal=True)
    reasons = dma.explain(q, k, v, **options)[backend]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    o, lse = dma.attention(q, k, v, **options, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(4)
    do = torch.randn(o.shape, generator=g).to(device)
    grads = torch.autograd.grad((o * do).sum(), leaves)

    # The formula on the -inf inputs: which rows have no key with a finite score.
    exact = [t.detach().cpu().double() for t in leaves]
    _, ref_lse = reference_attention(*exact[:3], key_bias=exact[3], attn_bias=exact[4],
                                     window=window, causal=True)
    empty = torch.isneginf(ref_lse).transpose(1, 2)  # (B, S, H)
    assert empty[1, :, 2:].all() and empty[:, 5:9].all()  # the rows set up to be empty
    # Gradients from the formula with -inf as -1e4 (exp underflows to exactly 0 in float64,
    # and finite scores rank above it as above -inf), the empty rows left out of the loss.
    ref = [torch.nan_to_num(t, neginf=-1e4).requires_grad_() for t in exact]
    ref_o, _ = reference_attention(*ref[:3], key_bias=ref[3], attn_bias=ref[4], window=window,
                                   causal=True)
    live = (~empty[..., None]).double()
    ref_grads = torch.autograd.grad((ref_o * live * do.cpu().double()).sum(), ref)

    torch.testing.assert_close(o.cpu().double(), ref_o * live, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
