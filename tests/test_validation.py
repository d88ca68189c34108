"""SPEC section 6: every misuse raises ValueError/TypeError naming the argument."""

import pytest
import torch

import dma

B, SQ, SK, H, HKV, D = 2, 8, 10, 4, 2, 16


def good():
    return (torch.randn(B, SQ, H, D), torch.randn(B, SK, HKV, D), torch.randn(B, SK, HKV, D))


BAD = [
    # (description, kwargs override, exception, words the message must contain)
    ("q rank", dict(q=torch.randn(SQ, H, D)), ValueError, ["q", "4 dims"]),
    ("k rank", dict(k=torch.randn(B, SK, D)), ValueError, ["k", "4 dims"]),
    ("v shape", dict(v=torch.randn(B, SK + 1, HKV, D)), ValueError, ["v", "shape"]),
    ("k head dim", dict(k=torch.randn(B, SK, HKV, D + 1)), ValueError, ["k", "D=16"]),
    ("k batch", dict(k=torch.randn(B + 1, SK, HKV, D)), ValueError, ["k", "B=2"]),
    ("H % Hkv", dict(k=torch.randn(B, SK, 3, D), v=torch.randn(B, SK, 3, D)), ValueError,
     ["H=4", "Hkv=3"]),
    ("dtype mismatch", dict(k=torch.randn(B, SK, HKV, D, dtype=torch.float64)), TypeError,
     ["k", "float64"]),
    ("int q", dict(q=torch.ones(B, SQ, H, D, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("q not tensor", dict(q=[1.0]), TypeError, ["q", "list"]),
    ("non-bool mask", dict(attn_mask=torch.ones(B, H, SQ, SK)), TypeError, ["attn_mask", "bool"]),
    ("non-bool padding", dict(key_padding_mask=torch.ones(B, SK)), TypeError,
     ["key_padding_mask", "bool"]),
    ("padding shape", dict(key_padding_mask=torch.ones(B, SK + 1, dtype=torch.bool)),
     ValueError, ["key_padding_mask", "(2, 10)"]),
    ("attn_bias broadcast", dict(attn_bias=torch.randn(B, 3, SQ, SK)), ValueError,
     ["attn_bias", "(2, 3, 8, 10)"]),
    ("attn_bias rank", dict(attn_bias=torch.randn(SQ, SK)), ValueError, ["attn_bias", "4 dims"]),
    ("attn_mask broadcast", dict(attn_mask=torch.ones(B, H, SQ, 2, dtype=torch.bool)),
     ValueError, ["attn_mask"]),
    ("attn_bias dtype", dict(attn_bias=torch.randn(B, H, SQ, SK, dtype=torch.float64)),
     TypeError, ["attn_bias", "float64"]),
    ("key_bias shape", dict(key_bias=torch.randn(B, 3, SK)), ValueError, ["key_bias", "Hb"]),
    ("key_bias len", dict(key_bias=torch.randn(B, H, SK - 1)), ValueError, ["key_bias", "Sk=10"]),
    ("key_bias rank", dict(key_bias=torch.randn(B, SK)), ValueError, ["key_bias"]),
    ("window 0", dict(window=0), ValueError, ["window", ">= 1"]),
    ("window float", dict(window=2.5), TypeError, ["window"]),
    ("window bool", dict(window=True), TypeError, ["window"]),
    ("window tensor", dict(window=torch.tensor(3)), TypeError, ["window", "torch.Tensor"]),
    ("softcap 0", dict(softcap=0.0), ValueError, ["softcap"]),
    ("softcap negative", dict(softcap=-1.0), ValueError, ["softcap"]),
    ("scale nan", dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    ("scale inf", dict(scale=float("inf")), ValueError, ["scale", "finite"]),
    ("scale str", dict(scale="1"), TypeError, ["scale"]),
    ("causal int", dict(causal=1), TypeError, ["causal"]),
    ("meta device", dict(k=torch.randn(B, SK, HKV, D, device="meta")), ValueError,
     ["k", "device"]),
]


@pytest.mark.parametrize("what,override,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, override, exc, words):
    q, k, v = good()
    kw = dict(q=q, k=k, v=v)
    kw.update(override)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises(exc) as info:
        dma.attention(q, k, v, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("shape", [(0, SQ, SK), (B, 0, SK), (B, SQ, 0)])
@pytest.mark.parametrize("window", [None, 3])
def test_empty_sizes(shape, window):
    b, sq, sk = shape
    q = torch.randn(b, sq, H, D, requires_grad=True)
    k = torch.randn(b, sk, HKV, D, requires_grad=True)
    v = torch.randn(b, sk, HKV, D, requires_grad=True)
    kb = torch.randn(b, H, sk, requires_grad=True)
    o, lse = dma.attention(q, k, v, key_bias=kb, window=window, causal=True, return_lse=True)
    assert o.shape == q.shape and lse.shape == (b, H, sq)
    assert (o == 0).all() and (lse == float("-inf")).all()
    o.sum().backward()
    for t in (q, k, v, kb):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()
