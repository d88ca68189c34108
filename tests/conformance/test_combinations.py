"""Random combinations of the features, every backend against the float64 reference.

The cases in cases.py take the features mostly one at a time; here each case draws all of
them at once (head layout, Sq against Sk, causality, window, key_bias layout, attn_bias and
attn_mask broadcasts, key padding, softcap, scale, strides, ties, empty rows, which inputs
want gradients), so that combinations no list names are checked too. The draws are seeded:
a failure names its seed, and `python -m pytest tests/conformance -k combination17`
runs it again. DMA_COMBINATION_SEED shifts every seed, for fresh cases beyond CI's.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from dma.dispatch import backends
from harness import Case, available_devices, check_case

COUNT = 30
FIRST_SEED = int(os.environ.get("DMA_COMBINATION_SEED", "0"))


def random_case(seed: int) -> Case:
    draw = random.Random(seed)
    heads, kv_heads = draw.choice([(4, 2), (4, 4), (6, 2), (4, 1), (3, 3), (8, 2)])
    batch = draw.choice([1, 2])
    seqlen_q = draw.choice([1, 2, 7, 24, 33, 64, 100, 129, 150])
    seqlen_k = draw.choice([1, 3, 24, 40, 64, 100, 130, 200])

    def broadcast_shape():
        return (draw.choice([1, batch]), draw.choice([1, kv_heads, heads]),
                draw.choice([1, seqlen_q]), draw.choice([1, seqlen_k]))

    window = draw.choice([1, 2, 5, 17, 40, 64, 300]) if draw.random() < 0.7 else None
    key_bias = None
    if (window is not None and draw.random() < 0.85) or draw.random() < 0.2:
        key_bias = (draw.choice([1, batch]), draw.choice([1, kv_heads, heads]))
    attn_bias = broadcast_shape() if draw.random() < 0.3 else None
    attn_mask, documents, empty_rows = None, 0, False
    if draw.random() < 0.3:
        attn_mask = broadcast_shape()
        if attn_mask[2:] == (seqlen_q, seqlen_k) and draw.random() < 0.3:
            documents = draw.choice([2, 3])
        empty_rows = draw.random() < 0.3
    return Case(
        name=f"combination{seed}", batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        heads=heads, kv_heads=kv_heads, head_dim=draw.choice([16, 32, 48, 64, 80]),
        dtype=draw.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
        causal=draw.random() < 0.6, window=window, key_bias=key_bias, attn_bias=attn_bias,
        attn_mask=attn_mask, key_padding=draw.random() < 0.3,
        softcap=draw.choice([None, None, None, 2.0, 10.0]),
        scale=draw.choice([None, None, None, 0.05, 1.5]),
        non_contiguous=draw.random() < 0.2,
        grads=tuple(n for n in ("q", "k", "v", "key_bias", "attn_bias") if draw.random() < 0.8),
        key_bias_ties=draw.random() < 0.25, empty_rows=empty_rows, mask_documents=documents,
        seed=seed)


SEEDS = range(FIRST_SEED, FIRST_SEED + COUNT)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(backends()))
@pytest.mark.parametrize("seed", SEEDS, ids=[f"combination{s}" for s in SEEDS])
def test_random_combination(seed, backend, device):
    check_case(random_case(seed), backend, device)
