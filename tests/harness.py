"""Run one case on one backend and check o, lse and every gradient against float64.

Tolerance: the backend's error may be at most 2x the torch backend's error in the same dtype
plus a small floor; the torch backend itself must stay under an absolute per-dtype bound.
NaN never passes, and every element is checked.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import pytest
import torch

import dma
from dma.dispatch import get_backend
from dma.validation import validate
from reference import reference_attention

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TORCH_BOUND = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
               torch.bfloat16: 6e-2}


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    forced = os.environ.get("DMA_TEST_DEVICE")
    return [forced] if forced else devices


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seqlen_q: int = 24
    seqlen_k: int = 24
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float32
    causal: bool = True
    window: Optional[int] = None
    key_bias: Optional[tuple] = None  # (batch, heads) of key_bias
    attn_bias: Optional[tuple] = None  # broadcast shape of attn_bias
    attn_mask: Optional[tuple] = None  # broadcast shape of attn_mask
    key_padding: bool = False
    softcap: Optional[float] = None
    scale: Optional[float] = None
    non_contiguous: bool = False
    grads: tuple = ("q", "k", "v", "key_bias", "attn_bias")
    key_bias_ties: bool = False  # integer-valued key_bias: many equal scores
    empty_rows: bool = False  # a mask that leaves some rows with no key
    # attn_mask as this many packed documents (block diagonal) instead of random pairs: many
    # tiles that the mask allows whole or not at all
    mask_documents: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def with_(self, **kw):
        return replace(self, **kw)


def make_inputs(case: Case, device):
    g = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    b, sq, sk, h, hkv, d = (case.batch, case.seqlen_q, case.seqlen_k, case.heads, case.kv_heads,
                            case.head_dim)

    def layout(t, seq_dim_len, heads):
        if not case.non_contiguous:
            return t
        # Same values, non-contiguous storage: (B, H, S, D) transposed to (B, S, H, D).
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    q = layout(randn(b, sq, h, d), sq, h)
    k = layout(randn(b, sk, hkv, d), sk, hkv)
    v = layout(randn(b, sk, hkv, d), sk, hkv)
    kw = {}
    if case.key_bias is not None:
        kb_b, kb_h = case.key_bias
        if case.key_bias_ties:
            kb = torch.randint(0, 3, (kb_b, kb_h, sk), generator=g).float()
        else:
            kb = 2 * randn(kb_b, kb_h, sk)
        kw["key_bias"] = kb
    if case.attn_bias is not None:
        kw["attn_bias"] = randn(*case.attn_bias)
    if case.attn_mask is not None:
        mask = torch.rand(*case.attn_mask, generator=g) > 0.3
        if case.mask_documents:
            rows, keys = case.attn_mask[2:]
            row_doc = torch.arange(rows) * case.mask_documents // rows
            key_doc = torch.arange(keys) * case.mask_documents // keys
            mask = (row_doc[:, None] == key_doc[None, :]).expand(case.attn_mask).clone()
        if case.empty_rows and mask.shape[2] > 1:
            mask[:, :, ::5] = False
        kw["attn_mask"] = mask
    if case.key_padding:
        pad = torch.rand(b, sk, generator=g) > 0.25
        pad[-1] = False  # one batch entry has no real key at all: all rows empty
        kw["key_padding_mask"] = pad
    go = randn(b, sq, h, d)
    glse = randn(b, h, sq)
    tensors = {"q": q, "k": k, "v": v, **kw}
    out = {}
    for name, t in tensors.items():
        t = t.to(device)
        if t.is_floating_point():
            t = t.to(case.dtype)
        out[name] = t
    return out, go.to(device), glse.to(device)


def call_kwargs(case: Case):
    return dict(window=case.window, causal=case.causal, scale=case.scale, softcap=case.softcap)


def compute(tensors, go, glse, case: Case, backend: Optional[str]):
    """Run forward and backward; return dict of float64 CPU results (o, lse, d<name>)."""
    leaves = {}
    args = {}
    for name, t in tensors.items():
        if t.is_floating_point() and name in case.grads:
            t = t.detach().clone().requires_grad_(True)
            leaves[name] = t
        args[name] = t
    kwargs = call_kwargs(case)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    if backend is None:
        o, lse = reference_attention(q, k, v, **args, **kwargs)
    else:
        o, lse = dma.attention(q, k, v, **args, **kwargs, return_lse=True, backend=backend)
        assert o.dtype == q.dtype and o.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    finite = torch.isfinite(lse)
    loss = (o.double() * go.double()).sum() + (torch.where(finite, lse.double(), 0) * glse).sum()
    if leaves:
        loss.backward()
    result = {"o": o.detach().double().cpu(), "lse": lse.detach().double().cpu()}
    for name, t in leaves.items():
        assert t.grad is not None, f"no gradient reached {name}"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype, name
        result["d" + name] = t.grad.double().cpu()
    return result


def reference_result(tensors, go, glse, case):
    cpu64 = {n: (t.detach().cpu().double() if t.is_floating_point() else t.cpu())
             for n, t in tensors.items()}
    return compute(cpu64, go.cpu().double(), glse.cpu().double(), case, None)


def relative_error(x, ref):
    assert not torch.isnan(x).any(), "NaN in result"
    both_inf = torch.isinf(ref) & (x == ref)
    diff = torch.where(both_inf, torch.zeros_like(x), (x - ref).abs())
    assert torch.isfinite(diff).all(), "infinite entries differ from the reference"
    scale = ref[torch.isfinite(ref)].abs().max() if torch.isfinite(ref).any() else 1.0
    return float(diff.max() / (scale + 1e-6)) if diff.numel() else 0.0


def check_case(case: Case, backend: str, device: str):
    tensors, go, glse = make_inputs(case, device)
    problem, _ = validate(tensors["q"], tensors["k"], tensors["v"],
                          **{n: t for n, t in tensors.items() if n not in "qkv"},
                          **call_kwargs(case))
    reasons = get_backend(backend).reasons(problem)
    if reasons:
        pytest.skip(f"{backend} cannot serve this case: " + "; ".join(reasons))
    ref = reference_result(tensors, go, glse, case)
    got = compute(tensors, go, glse, case, backend)
    baseline = got if backend == "torch" else compute(tensors, go, glse, case, "torch")
    failures = []
    for name, r in ref.items():
        err = relative_error(got[name], r)
        base = relative_error(baseline[name], r)
        if backend == "torch":
            bound = TORCH_BOUND[case.dtype]
            if name == "lse":  # lse is float32 for every input dtype (SPEC section 4)
                bound = max(bound, 1e-6)
        else:
            bound = 2 * base + FLOOR[case.dtype]
        if not err <= bound:
            failures.append(f"{name}: error {err:.3g} > bound {bound:.3g} (torch {base:.3g})")
    assert not failures, f"{case.name} on {backend}/{device}: " + "; ".join(failures)


def benchmark_script(name: str):
    """The module of benchmarks/<name>.py (the scripts are not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
