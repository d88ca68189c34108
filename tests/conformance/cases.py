"""The conformance cases: one list, shared by every backend (SPEC sections 1-5)."""

from __future__ import annotations

import itertools

import torch

from harness import Case

B, H, HKV, SQ, SK = 2, 4, 2, 24, 24


def _cases():
    base = Case("base")
    yield base
    # Head layouts.
    yield base.with_(name="mha", kv_heads=4)
    yield base.with_(name="gqa", heads=6, kv_heads=2)
    yield base.with_(name="mqa", kv_heads=1)
    # Sq != Sk both ways, causal bottom-right; decoding (Sq = 1).
    for sq, sk in ((9, 30), (30, 9), (1, 33), (3, 40)):
        yield base.with_(name=f"causal_sq{sq}_sk{sk}", seqlen_q=sq, seqlen_k=sk)
        yield base.with_(name=f"window_sq{sq}_sk{sk}", seqlen_q=sq, seqlen_k=sk, window=5,
                         key_bias=(B, HKV))
    yield base.with_(name="noncausal", causal=False)
    yield base.with_(name="noncausal_window", causal=False, window=6, key_bias=(B, H))
    # Windows: 1, small, >= Sk; with and without key_bias.
    for w in (1, 4, SK, SK + 7):
        yield base.with_(name=f"window{w}", window=w, key_bias=(B, HKV))
    yield base.with_(name="window_no_bias", window=5)
    # key_bias layouts: batch 1 or B, heads 1, Hkv or H.
    for kb_b, kb_h in itertools.product((1, B), (1, HKV, H)):
        yield base.with_(name=f"key_bias_b{kb_b}_h{kb_h}", key_bias=(kb_b, kb_h), window=6)
        yield base.with_(name=f"key_bias_b{kb_b}_h{kb_h}_nowindow", key_bias=(kb_b, kb_h))
    # attn_bias and attn_mask in every broadcast shape.
    for shape in itertools.product((1, B), (1, HKV, H), (1, SQ), (1, SK)):
        tag = "x".join(map(str, shape))
        yield base.with_(name=f"attn_bias_{tag}", attn_bias=shape)
        yield base.with_(name=f"attn_mask_{tag}", attn_mask=shape)
    for shape in ((B, H, SQ, SK), (1, HKV, SQ, 1), (B, 1, 1, SK)):
        tag = "x".join(map(str, shape))
        yield base.with_(name=f"attn_bias_window_{tag}", attn_bias=shape, window=5,
                         key_bias=(B, HKV))
        yield base.with_(name=f"attn_mask_window_{tag}", attn_mask=shape, window=5,
                         key_bias=(1, H))
    # Packed documents over several blocks: tiles that the mask and causality allow whole
    # (walked without the per-pair test), with padding and an attn_bias still applied there.
    docs = dict(seqlen_q=200, seqlen_k=200, attn_mask=(1, 1, 200, 200), mask_documents=3)
    yield base.with_(name="packed_documents", batch=1, **docs)
    yield base.with_(name="packed_documents_padding_bias", key_padding=True,
                     attn_bias=(1, H, 200, 200), **docs)
    yield base.with_(name="packed_documents_sq_sk", batch=1, seqlen_q=130, seqlen_k=200,
                     attn_mask=(1, 1, 130, 200), mask_documents=2)
    yield base.with_(name="packed_documents_noncausal", batch=1, causal=False, **docs)
    yield base.with_(name="bfloat16_packed_documents", batch=1, dtype=torch.bfloat16, **docs)
    yield base.with_(name="key_padding", key_padding=True)
    yield base.with_(name="key_padding_window", key_padding=True, window=5, key_bias=(B, H))
    yield base.with_(name="softcap", softcap=3.0, key_bias=(B, H), window=7)
    yield base.with_(name="softcap_attn_bias", softcap=2.0, attn_bias=(1, H, SQ, SK))
    yield base.with_(name="scale", scale=0.3, window=6, key_bias=(1, 1))
    yield base.with_(name="empty_rows_mask", attn_mask=(B, H, SQ, SK), empty_rows=True)
    yield base.with_(name="empty_rows_causal", seqlen_q=30, seqlen_k=9, key_bias=(B, HKV),
                     window=3)
    yield base.with_(name="non_contiguous", non_contiguous=True, window=5, key_bias=(B, H),
                     attn_mask=(B, 1, SQ, SK))
    yield base.with_(name="ties", key_bias=(B, HKV), key_bias_ties=True, window=5)
    yield base.with_(name="bias_only_grad", grads=("key_bias",), key_bias=(B, H), window=5)
    yield base.with_(name="attn_bias_only_grad", grads=("attn_bias",), attn_bias=(B, H, SQ, SK))
    yield base.with_(name="no_grad", grads=())
    # Long enough for several coarse backward blocks and many candidate tiles per block.
    yield base.with_(name="long_window", batch=1, seqlen_q=600, seqlen_k=640, window=40,
                     key_bias=(1, HKV))
    # A window wide against the query blocks: most candidate tiles are kept by every row.
    yield base.with_(name="long_wide_window", batch=1, seqlen_q=600, seqlen_k=600, window=300,
                     key_bias=(1, HKV))
    # 16-bit inputs over several blocks of every kernel (the cupy forward's blocks hold 128
    # rows in 16-bit types, dq's 64), with and without a softcap (the cupy warpgroup kernels
    # compile their fully kept and interval tiles separately for each).
    for dtype, tag in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        yield base.with_(name=f"{tag}_long_window", batch=1, seqlen_q=300, seqlen_k=320,
                         window=40, key_bias=(1, HKV), dtype=dtype)
        yield base.with_(name=f"{tag}_softcap_long_window", batch=1, seqlen_q=300,
                         seqlen_k=320, window=40, key_bias=(1, HKV), softcap=5.0, dtype=dtype)
    yield base.with_(name="long_window_ties", batch=1, seqlen_q=600, seqlen_k=600, window=70,
                     key_bias=(1, 1), key_bias_ties=True, grads=("q", "k", "v", "key_bias"))
    # Head dims, with a short sequence to keep the dense reference cheap.
    for d in (16, 32, 64, 80, 96, 128, 256):
        yield base.with_(name=f"head_dim{d}", head_dim=d, seqlen_q=16, seqlen_k=20,
                         window=6, key_bias=(B, HKV))


def _dtype_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        name = str(dtype).replace("torch.", "")
        common = Case("dtype", dtype=dtype, seed=1)
        yield common.with_(name=f"{name}_dense")
        yield common.with_(name=f"{name}_window", window=5, key_bias=(B, HKV))
        yield common.with_(name=f"{name}_masks", attn_bias=(B, 1, SQ, SK), attn_mask=(1, H, SQ, SK),
                           key_padding=True, softcap=4.0)


CASES = list(_cases()) + list(_dtype_cases())
