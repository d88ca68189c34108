"""Side-by-side timing of dma against dense attention and FlexAttention, on one device.

Shared by `python -m dma demo` and `benchmarks/bench_attention.py`. Every contender gets the
same random inputs (never zeros); times are medians of repeated runs, with CUDA events on GPUs.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import dma


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    window: Optional[int]
    dtype: torch.dtype
    seqlen_q: Optional[int] = None  # None: same as seqlen; 1: decoding one token

    @property
    def queries(self) -> int:
        return self.seqlen if self.seqlen_q is None else self.seqlen_q

    @property
    def label(self):
        w = "none" if self.window is None else self.window
        seq = f"S{self.seqlen}" if self.seqlen_q is None else f"Sq{self.seqlen_q}/Sk{self.seqlen}"
        return (f"B{self.batch} {seq} H{self.heads}/{self.kv_heads} D{self.head_dim} "
                f"w={w} {str(self.dtype).replace('torch.', '')}")


def make_inputs(shape: Shape, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=shape.dtype)

    q = rand(shape.batch, shape.queries, shape.heads, shape.head_dim)
    k = rand(shape.batch, shape.seqlen, shape.kv_heads, shape.head_dim)
    v = rand(shape.batch, shape.seqlen, shape.kv_heads, shape.head_dim)
    key_bias = rand(shape.batch, shape.kv_heads, shape.seqlen)
    return q, k, v, key_bias


def time_once_ms(fn: Callable, device: torch.device) -> float:
    """One call's time in ms: CUDA events on GPUs, wall clock on CPUs."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def back_to_back_ms(fn: Callable, device: torch.device, calls: int) -> float:
    """Mean time per call of `calls` calls issued in a row (the way a model calls a layer):
    host work of one call overlaps the GPU work of the previous ones, so a call whose host
    time exceeds its GPU time shows here, and not in `time_once_ms`, at its host time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - t0) / calls


def median_ms(fn: Callable, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_once_ms(fn, device) for _ in range(reps))


def _fwd_bwd(forward: Callable, leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = forward()
        out.backward(torch.ones_like(out))  # a fixed, non-zero upstream gradient

    return run


def dma_contender(shape: Shape, inputs, backend: Optional[str]):
    q, k, v, key_bias = inputs

    def forward():
        return dma.attention(q, k, v, key_bias=key_bias, window=shape.window, causal=True,
                             backend=backend)

    return forward


def sdpa_contender(inputs, kernel: Optional[str]):
    """Dense causal attention through torch SDPA, optionally pinned to one kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = inputs
    group = q.shape[2] // k.shape[2]

    def per_query_head(t):
        """K or V with one head per query head, built once outside the timed region so the
        dense baseline pays no GQA copy (a leaf of its own when gradients are timed)."""
        t = t.transpose(1, 2)
        if group == 1:
            return t
        return t.repeat_interleave(group, 1).detach().requires_grad_(t.requires_grad)

    qt, kk, vv = q.transpose(1, 2), per_query_head(k), per_query_head(v)
    pinned = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "math": SDPBackend.MATH}.get(kernel)
    # SDPA's causal mask is top-left aligned; a single decoding query sees every key anyway.
    causal = q.shape[1] > 1

    def forward():
        kk.grad = vv.grad = None
        if pinned is None:
            return F.scaled_dot_product_attention(qt, kk, vv, is_causal=causal)
        with sdpa_kernel([pinned]):
            return F.scaled_dot_product_attention(qt, kk, vv, is_causal=causal)

    return forward


def flex_contender(shape: Shape, inputs):
    """FlexAttention given DMA's exact mask (per-key row intervals from dma's plan) and the
    key_bias as a score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .autograd import make_plan
    from .dispatch import get_backend
    from .validation import validate

    q, k, v, key_bias = inputs
    problem, vinputs = validate(q, k, v, key_bias=key_bias, window=shape.window, causal=True)
    plan = make_plan(problem, vinputs, get_backend("torch"))
    group = shape.heads // shape.kv_heads
    if plan is None:
        def mask_mod(b, h, i, j):
            return j <= i
    else:
        first, end = plan.key_first_row, plan.key_end_row  # (B, Hkv, S)

        def mask_mod(b, h, i, j):
            hk = h // group
            return (i >= first[b, hk, j]) & (i < end[b, hk, j])

    def score_mod(score, b, h, i, j):
        return score + key_bias[b, h // group, j]

    block_mask = create_block_mask(mask_mod, shape.batch, shape.heads, shape.queries,
                                   shape.seqlen, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def forward():
        return compiled(qt, kt, vt, score_mod=score_mod, block_mask=block_mask,
                        enable_gqa=group > 1)

    return forward


def _timed_function(shape: Shape, contender: str, mode: str, inputs, backend):
    """The function to time for one contender: forward under no_grad, or forward+backward."""
    if contender == "dma" or contender.startswith("dma-"):  # dma-<backend>
        forward = dma_contender(shape, inputs, contender.partition("-")[2] or backend)
    elif contender.startswith("sdpa"):
        forward = sdpa_contender(inputs, contender.partition("-")[2] or None)
    elif contender == "flex":
        forward = flex_contender(shape, inputs)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    if mode == "fwd+bwd":
        return _fwd_bwd(forward, inputs[:4])
    return torch.no_grad()(forward)


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def run_benchmark(shapes, device, contenders=("dma", "sdpa"), backend=None, modes=("fwd",
                  "fwd+bwd"), warmup=2, reps=5, progress=True):
    """Return a list of dict rows: shape, contender, mode, ms, ratio to the dense baseline,
    and ms_b2b.

    For each shape and mode the contenders' repetitions are interleaved (one call of each in
    turn), so a slow spell of a shared machine hits them all alike and the ratios stay fair.
    `ms` times each call from an idle device (its host time counts in full); `ms_b2b` is the
    time per call of `reps` calls in a row, which is what a model issuing layer after layer
    sees when the host runs ahead.
    """
    from tqdm import tqdm

    device = torch.device(device)
    groups = [(s, m) for s in shapes for m in modes]
    rows = []
    bar = tqdm(total=len(groups) * len(contenders) * (warmup + reps), desc="timing",
               disable=not progress)
    for shape, mode in groups:
        inputs = make_inputs(shape, device)
        for t in inputs:
            t.requires_grad_(mode == "fwd+bwd")
        functions, notes = {}, {c: "" for c in contenders}
        for contender in contenders:
            try:
                fn = _timed_function(shape, contender, mode, inputs, backend)
                for _ in range(warmup):
                    fn()
                functions[contender] = fn
            except Exception as exc:  # a contender that cannot run here is reported, not fatal
                notes[contender] = _failure(exc)
            bar.update(warmup)
        times = {c: [] for c in contenders}
        # Peak memory a call allocates beyond what was allocated before it (CUDA only).
        peaks = {c: 0.0 if device.type == "cuda" else float("nan") for c in contenders}
        for _ in range(reps):
            for contender, fn in list(functions.items()):
                try:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    times[contender].append(time_once_ms(fn, device))
                    if device.type == "cuda":
                        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                        peaks[contender] = max(peaks[contender], peak)
                except Exception as exc:
                    notes[contender] = _failure(exc)
                    times[contender], peaks[contender] = [], float("nan")
                    del functions[contender]
                bar.update(1)
        in_a_row = {c: float("nan") for c in contenders}
        for contender, fn in functions.items():
            try:
                in_a_row[contender] = back_to_back_ms(fn, device, reps)
            except Exception as exc:
                notes[contender] = _failure(exc)
        for contender in contenders:
            timed = bool(times[contender])
            rows.append(dict(shape=shape.label, contender=contender, mode=mode,
                             ms=statistics.median(times[contender]) if timed else float("nan"),
                             extra_mib=peaks[contender] if timed else float("nan"),
                             note=notes[contender], ms_b2b=in_a_row[contender]))
        del functions, inputs
    bar.close()
    baseline = {}
    for r in rows:
        if r["contender"] == contenders[1 if len(contenders) > 1 else 0]:
            baseline[(r["shape"], r["mode"])] = r["ms"]
    for r in rows:
        base = baseline.get((r["shape"], r["mode"]))
        r["ratio"] = r["ms"] / base if base else float("nan")
    return rows


def format_table(rows, baseline_name) -> str:
    header = (f"{'shape':46} {'contender':12} {'mode':8} {'ms':>9} {'x ' + baseline_name:>12} "
              f"{'extra MiB':>10} {'b2b ms':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['shape']:46} {r['contender']:12} {r['mode']:8} {r['ms']:9.3f} "
                     f"{r['ratio']:12.3f} {r['extra_mib']:10.0f} {r['ms_b2b']:9.3f} "
                     f"{r['note']}".rstrip())
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
