"""Side-by-side timing of dma against dense attention and FlexAttention, on one device.

Shared by `python -m dma demo` and `benchmarks/bench_attention.py`. Every contender gets the
same random inputs (never zeros); times are medians of repeated runs, with CUDA events on GPUs.
"""

from __future__ import annotations

import collections
import csv
import functools
import os
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


def document_ids(seqlen: int, docs: int, device) -> torch.Tensor:
    """Each token's document: `docs` documents of (nearly) equal length, packed."""
    return torch.arange(seqlen, device=device) * docs // seqlen


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """The (1, 1, S, S) bool attn_mask of the tokens' document ids `doc` (S,), such as
    `document_ids` gives: a token attends only within its own document."""
    return (doc[:, None] == doc[None, :])[None, None]


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


def kernel_us_per_call(fn: Callable, calls: int) -> dict:
    """{kernel name: GPU us per call} over `calls` calls of `fn` (after one unprofiled
    call), from torch.profiler; names are cut at their template or argument list."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:  # kernels, copies
            name = event.name.split("(")[0].split("<")[0].removeprefix("void ")
            per_kernel[name[:40]] += event.device_time / calls
    return dict(per_kernel)


def host_and_wall_ms(fn: Callable, calls: int, warmup: int = 5) -> tuple[float, float]:
    """(host, wall) ms per call of `calls` CUDA calls issued without synchronising: host is
    how long issuing them took, wall includes the GPU finishing. A call whose host time
    exceeds its GPU time is host-bound."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return 1e3 * (issued - start) / calls, 1e3 * (done - start) / calls


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


def dma_contender(shape: Shape, inputs, backend: Optional[str], plan_graphs: bool = True):
    """dma's forward; `plan_graphs=False` builds every selection plan eagerly
    (DMA_PLAN_GRAPHS=0 for the call), for A/B runs of dma/plan_graphs.py."""
    q, k, v, key_bias = inputs

    def forward():
        return dma.attention(q, k, v, key_bias=key_bias, window=shape.window, causal=True,
                             backend=backend)

    if plan_graphs:
        return forward

    def forward_with_eager_plan():
        before = os.environ.get("DMA_PLAN_GRAPHS")
        os.environ["DMA_PLAN_GRAPHS"] = "0"
        try:
            return forward()
        finally:
            if before is None:
                del os.environ["DMA_PLAN_GRAPHS"]
            else:
                os.environ["DMA_PLAN_GRAPHS"] = before

    return forward_with_eager_plan


def sdpa_contender(inputs, kernel: Optional[str], attn_mask=None):
    """Dense causal attention through torch SDPA, optionally pinned to one kernel; with
    `attn_mask` (bool, True = attend, causality included) that mask instead of causality."""
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

    masks = dict(is_causal=causal) if attn_mask is None else dict(attn_mask=attn_mask)

    def forward():
        kk.grad = vv.grad = None
        if pinned is None:
            return F.scaled_dot_product_attention(qt, kk, vv, **masks)
        with sdpa_kernel([pinned]):
            return F.scaled_dot_product_attention(qt, kk, vv, **masks)

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


def capture_graph(fn: Callable):
    """`fn` captured once in a CUDA graph, after warm-up calls on a side stream (which compile
    kernels and fit launch configurations outside the capture). Returns (replay, what the
    captured call returned): every replay reads and writes the same tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph.replay, result


def graph_replay(fn: Callable) -> Callable:
    """`fn` replayed from a CUDA graph: host time drops to one graph launch, as in serving
    stacks that capture their decoding step."""
    return capture_graph(fn)[0]


def _timed_function(shape: Shape, contender: str, mode: str, inputs, backend,
                    cuda_graph: bool = False):
    """The function to time for one contender: forward under no_grad, or forward+backward;
    with `cuda_graph` the forward replayed from a CUDA graph."""
    if contender == "dma" or contender.startswith("dma-"):  # dma-<backend>[:eager-plan]
        name, _, variant = contender.partition(":")
        if variant not in ("", "eager-plan"):
            raise ValueError(f"unknown dma variant {variant!r} (known: eager-plan)")
        forward = dma_contender(shape, inputs, name.partition("-")[2] or backend,
                                plan_graphs=variant != "eager-plan")
    elif contender.startswith("sdpa"):
        forward = sdpa_contender(inputs, contender.partition("-")[2] or None)
    elif contender == "flex":
        forward = flex_contender(shape, inputs)
    else:
        raise ValueError(f"unknown contender {contender!r}")
    if mode == "fwd+bwd":
        if cuda_graph:
            raise ValueError("CUDA graph timing covers the forward only")
        return _fwd_bwd(forward, inputs[:4])
    forward = torch.no_grad()(forward)
    return graph_replay(forward) if cuda_graph else forward


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def time_interleaved(functions: dict, device: torch.device, warmup: int, reps: int,
                     bar=None) -> dict:
    """Time several callables on one workload, their repetitions interleaved (one call of
    each in turn) so that a slow spell of a shared machine hits them all alike. Returns per
    name a dict: ms (median, each call timed from an idle device), extra_mib (peak memory a
    call allocates beyond what was allocated before it; CUDA only), ms_b2b (time per call of
    `reps` calls in a row) and note (why it could not run, if so)."""
    results = {name: dict(ms=float("nan"), extra_mib=float("nan"), ms_b2b=float("nan"),
                          note="") for name in functions}
    ready = {}
    for name, make in functions.items():
        try:
            fn = make()
            for _ in range(warmup):
                fn()
            ready[name] = fn
        except Exception as exc:  # a contender that cannot run here is reported, not fatal
            results[name]["note"] = _failure(exc)
        if bar is not None:
            bar.update(warmup)
    times = {name: [] for name in ready}
    peaks = {name: 0.0 if device.type == "cuda" else float("nan") for name in ready}
    for _ in range(reps):
        for name, fn in list(ready.items()):
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                times[name].append(time_once_ms(fn, device))
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                    peaks[name] = max(peaks[name], peak)
            except Exception as exc:
                results[name]["note"] = _failure(exc)
                del ready[name]
            if bar is not None:
                bar.update(1)
    for name, fn in ready.items():
        result = results[name]
        result.update(ms=statistics.median(times[name]), extra_mib=peaks[name])
        try:
            result["ms_b2b"] = back_to_back_ms(fn, device, reps)
        except Exception as exc:
            result["note"] = _failure(exc)
    return results


def add_ratios(rows, baseline_name: str):
    """Each row's time over the baseline contender's time for the same shape and mode."""
    baseline = {(r["shape"], r["mode"]): r["ms"] for r in rows
                if r["contender"] == baseline_name}
    for r in rows:
        base = baseline.get((r["shape"], r["mode"]))
        r["ratio"] = r["ms"] / base if base else float("nan")
    return rows


def run_benchmark(shapes, device, contenders=("dma", "sdpa"), backend=None, modes=("fwd",
                  "fwd+bwd"), warmup=2, reps=5, progress=True, cuda_graph=False):
    """Return a list of dict rows: shape, contender, mode, ms, extra_mib, note, ms_b2b and
    ratio to the dense baseline (the second contender), contenders interleaved
    (`time_interleaved`). `ms` times each call from an idle device (its host time counts in
    full); `ms_b2b` is what a model issuing layer after layer sees when the host runs ahead.
    With `cuda_graph` every contender's forward is replayed from a CUDA graph (mode
    "fwd graph"), which leaves the device time alone; contenders then run one after another.
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

        makers = {c: functools.partial(_timed_function, shape, c, mode, inputs, backend,
                                       cuda_graph) for c in contenders}
        if cuda_graph:
            # One contender's graph at a time: with the graphs of several contenders alive
            # and replayed in turn, one H200 run ended in an illegal memory access (not
            # investigated); each contender alone replayed cleanly.
            results = {}
            for name, make in makers.items():
                results.update(time_interleaved({name: make}, device, warmup, reps, bar))
        else:
            results = time_interleaved(makers, device, warmup, reps, bar)
        del makers
        label = f"{mode} graph" if cuda_graph else mode
        rows += [dict(shape=shape.label, contender=c, mode=label, **results[c])
                 for c in contenders]
        del inputs
    bar.close()
    return add_ratios(rows, contenders[1 if len(contenders) > 1 else 0])


def format_table(rows, baseline_name) -> str:
    header = (f"{'shape':46} {'contender':20} {'mode':8} {'ms':>9} {'x ' + baseline_name:>12} "
              f"{'extra MiB':>10} {'b2b ms':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['shape']:46} {r['contender']:20} {r['mode']:8} {r['ms']:9.3f} "
                     f"{r['ratio']:12.3f} {r['extra_mib']:10.0f} {r['ms_b2b']:9.3f} "
                     f"{r['note']}".rstrip())
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
