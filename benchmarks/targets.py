"""Every performance target of the triton and cupy issues, measured in one run, verdicts last.

    python benchmarks/targets.py                          # every case, triton and cupy
    python benchmarks/targets.py --cases 16k plan --deadline 300
    python benchmarks/targets.py --out results/h100/targets --plot docs/targets_h100.png

Cases, in the order they run (`--deadline` skips a case that would start past it):

| case | shape (bf16, B1, H32/8, D128, causal) | modes | baselines |
|---|---|---|---|
| 16k | 16384 tokens, window 2048 | fwd, fwd+bwd | cuDNN, FlexAttention |
| plan | the 16k forward: share of the selection plan in its GPU time (torch profiler) | fwd | |
| nowindow | 16384 tokens, no window | fwd, fwd+bwd | SDPA flash |
| 4k | 4096 tokens, window 2048 | fwd, fwd+bwd | cuDNN, FlexAttention |
| decode | 1 query against 131072 keys, window 2048 | fwd | cuDNN over every key, FlexAttention |
| 128k | 131072 tokens, window 2048 | fwd | cuDNN, FlexAttention |

The first of `--backends` (default: triton) is held to the triton issue's targets, the second
(default: cupy) to the cupy issue's, which include "within 1.5x of the first on every row".
Every ratio is taken twice, from idle (each call issued to an idle GPU, its host time in
full) and back to back (calls issued in a row, as a model issues its layers); a target is
"met" when both meet it. The contenders of a case are timed interleaved in one process
(`dma.benchmarking.run_benchmark`), so ratios compare like with like; times themselves
differ between cards and machine starts.

Writes `rows.csv` (every timing, the format `plot_results.py` reads) and `targets.csv` (the
verdict table) to `--out`; `--plot` draws each target's ratios against its limit.
On a CPU, `--scale N` divides every length and window by N so the flow can be tried
(`--backends torch numba`); the GPU baselines then report why they cannot run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from dma.benchmarking import (
    Shape,
    format_table,
    kernel_us_per_call,
    make_inputs,
    run_benchmark,
    write_csv,
)
from dma.packages import installed

CUDNN, FLASH, FLEX = "sdpa-cudnn", "sdpa-flash", "flex"


@dataclass(frozen=True)
class Case:
    name: str
    seqlen: int
    window: Optional[int]
    modes: tuple
    baselines: tuple  # the first is the ratio baseline of the printed table
    seqlen_q: Optional[int] = None
    reps: int = 5


CASES = (
    Case("16k", 16384, 2048, ("fwd", "fwd+bwd"), (CUDNN, FLEX)),
    Case("plan", 16384, 2048, ("fwd",), ()),
    Case("nowindow", 16384, None, ("fwd", "fwd+bwd"), (FLASH,)),
    Case("4k", 4096, 2048, ("fwd", "fwd+bwd"), (CUDNN, FLEX), reps=7),
    Case("decode", 131072, 2048, ("fwd",), (CUDNN, FLEX), seqlen_q=1, reps=7),
    Case("128k", 131072, 2048, ("fwd",), (CUDNN, FLEX), reps=3),
)
PLAN_CASE = "plan"


@dataclass(frozen=True)
class Target:
    """`contender`'s time over `baseline`'s in (case, mode) at most `limit`; `baseline` is
    a contender name, or PLAN_SHARE for the plan's share of the forward's GPU time."""
    issue: str  # "first" or "second" of --backends
    case: str
    mode: str
    baseline: str
    limit: float


PLAN_SHARE = "plan share"
TARGETS = (
    Target("first", "16k", "fwd", CUDNN, 0.30),
    Target("first", "16k", "fwd+bwd", CUDNN, 0.35),
    Target("first", "4k", "fwd", CUDNN, 1.0),
    Target("first", "4k", "fwd+bwd", CUDNN, 1.0),
    Target("first", "nowindow", "fwd", FLASH, 1.0),
    Target("first", "nowindow", "fwd+bwd", FLASH, 1.0),
    Target("first", "128k", "fwd", CUDNN, 0.06),
    Target("first", "plan", "fwd", PLAN_SHARE, 0.10),
    Target("first", "decode", "fwd", CUDNN, 1 / 3),
    *(Target("first", case, mode, FLEX, 1.0) for case, mode in (
        ("16k", "fwd"), ("16k", "fwd+bwd"), ("4k", "fwd"), ("4k", "fwd+bwd"),
        ("decode", "fwd"), ("128k", "fwd"))),
    Target("second", "16k", "fwd", CUDNN, 0.45),
    Target("second", "16k", "fwd+bwd", CUDNN, 0.55),
    Target("second", "nowindow", "fwd", FLASH, 1.3),
)
# The second backend within this factor of the first on every row both ran.
SECOND_AGAINST_FIRST = 1.5


def shape_of(case: Case, args) -> Shape:
    scale = args.scale
    window = None if case.window is None else max(1, case.window // scale)
    return Shape(1, max(1, case.seqlen // scale), args.heads, args.kv_heads, args.head_dim,
                 window, getattr(torch, args.dtype), case.seqlen_q)


def plan_shares(shape: Shape, device, backends, calls: int = 10) -> list[dict]:
    """Per backend, the GPU time of its selection plan alone and of its whole forward (plan
    included), us per call by the torch profiler, and the plan's share of the forward."""
    inputs = make_inputs(shape, device)
    rows = []
    for name in backends:
        row = dict(case=PLAN_CASE, contender=f"dma-{name}", plan_us=math.nan,
                   forward_us=math.nan, share=math.nan, note="")
        try:
            if device.type != "cuda":
                raise RuntimeError("GPU time needs a CUDA device")
            row["plan_us"], row["forward_us"] = _plan_and_forward_us(shape, inputs, name, calls)
            row["share"] = row["plan_us"] / row["forward_us"]
        except Exception as exc:  # reported in the table, as the benchmark does
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows.append(row)
    return rows


def _plan_and_forward_us(shape: Shape, inputs, backend_name: str, calls: int):
    import dma
    from dma.autograd import make_plan
    from dma.dispatch import get_backend
    from dma.validation import validate

    q, k, v, key_bias = inputs
    backend = get_backend(backend_name)
    problem, checked = validate(q, k, v, key_bias=key_bias, window=shape.window, causal=True)

    @torch.no_grad()
    def plan_only():
        make_plan(problem, checked, backend)

    @torch.no_grad()
    def forward():
        dma.attention(q, k, v, key_bias=key_bias, window=shape.window, causal=True,
                      backend=backend_name)

    for _ in range(3):  # compile, then capture the plan's CUDA graph
        forward()
    plan_us = sum(kernel_us_per_call(plan_only, calls).values())
    return plan_us, sum(kernel_us_per_call(forward, calls).values())


def _ratio(row, base, key):
    if row is None or base is None or not base[key] > 0:
        return math.nan
    return row[key] / base[key]


def _verdict(limit: float, ratios) -> str:
    if any(math.isnan(r) for r in ratios):
        return "not measured"
    met = [r <= limit for r in ratios]
    if len(met) == 1:
        return "yes" if met[0] else "no"
    return {(True, True): "yes", (False, False): "no", (True, False): "from idle only",
            (False, True): "back to back only"}[tuple(met)]


def verdicts(rows: list[dict], shares: list[dict], first: str, second: Optional[str],
             cases: set) -> list[dict]:
    """The target table: per target, the measured ratios from idle and back to back, the
    limit and whether it is met; targets whose case did not run say so."""
    by_key = {(r["case"], r["mode"], r["contender"]): r for r in rows}
    backend_of = {"first": first, "second": second}
    table = []

    def add(backend, case, mode, baseline, limit, idle, b2b, note=""):
        ran = case in cases
        table.append(dict(
            backend=backend, case=case, mode=mode, against=baseline, limit=round(limit, 4),
            ratio_idle=idle, ratio_b2b=b2b,
            met=_verdict(limit, [idle] if b2b is None else [idle, b2b]) if ran else "not run",
            note=note))

    for t in TARGETS:
        backend = backend_of[t.issue]
        if backend is None:
            continue
        if t.baseline == PLAN_SHARE:
            share = next((s for s in shares if s["contender"] == f"dma-{backend}"), None)
            add(backend, t.case, t.mode, PLAN_SHARE, t.limit,
                share["share"] if share else math.nan, None,
                share["note"] if share else "")
            continue
        row = by_key.get((t.case, t.mode, f"dma-{backend}"))
        base = by_key.get((t.case, t.mode, t.baseline))
        note = ""
        if row is not None and t.case == "128k":
            note = f"extra memory {row['extra_mib']:.0f} MiB"
        for r in (row, base):
            if r is not None and r["note"]:
                note = f"{r['contender']}: {r['note']}"
        add(backend, t.case, t.mode, t.baseline, t.limit, _ratio(row, base, "ms"),
            _ratio(row, base, "ms_b2b"), note)
    if second is not None:
        for (case, mode, contender), row in by_key.items():
            if contender != f"dma-{second}":
                continue
            base = by_key.get((case, mode, f"dma-{first}"))
            add(second, case, mode, f"dma-{first}", SECOND_AGAINST_FIRST,
                _ratio(row, base, "ms"), _ratio(row, base, "ms_b2b"))
    case_order = [c.name for c in CASES]
    return sorted(table, key=lambda t: (t["backend"] != first, case_order.index(t["case"])))


def format_verdicts(table: list[dict]) -> str:
    header = (f"{'backend':8} {'case':9} {'mode':8} {'against':11} {'idle':>8} {'b2b':>8} "
              f"{'limit':>7}  met")
    lines = [header, "-" * len(header)]
    for t in table:
        b2b = "" if t["ratio_b2b"] is None else f"{t['ratio_b2b']:8.3f}"
        lines.append(f"{t['backend']:8} {t['case']:9} {t['mode']:8} {t['against']:11} "
                     f"{t['ratio_idle']:8.3f} {b2b:>8} {t['limit']:7.3f}  {t['met']}"
                     + (f"  ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


def plot_verdicts(table: list[dict], path: str, title: str):
    """One bar per target and timing (ratio over its limit), the limit at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in table if not math.isnan(t["ratio_idle"])]
    labels = [f"{t['backend']} {t['case']} {t['mode']} / {t['against']}" for t in shown]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(shown) + 1.2))
    y = range(len(shown))
    ax.barh([i - 0.2 for i in y], [t["ratio_idle"] / t["limit"] for t in shown], 0.4,
            label="from idle")
    ax.barh([i + 0.2 for i in y], [(t["ratio_b2b"] if t["ratio_b2b"] is not None
                                    else t["ratio_idle"]) / t["limit"] for t in shown], 0.4,
            label="back to back")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio / target limit (met at or left of 1)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--backends", nargs="+", default=["triton", "cupy"],
                        help="first: the triton issue's targets; second: the cupy issue's")
    parser.add_argument("--cases", nargs="+", default=[c.name for c in CASES],
                        choices=[c.name for c in CASES])
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds: cases that would start later are skipped")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide every length and window by this (CPU trials)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--reps", type=int, default=None, help="override every case's reps")
    parser.add_argument("--out", default="targets-results")
    parser.add_argument("--plot", default=None, help="PNG of the verdicts")
    args = parser.parse_args(argv)
    if not 1 <= len(args.backends) <= 2:
        parser.error("--backends takes one or two backend names")
    if args.scale < 1:
        parser.error("--scale must be a positive integer")
    if args.plot and not installed("matplotlib"):  # known before the run, not after it
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    device = torch.device(args.device)
    first, second = args.backends[0], (args.backends[1:] or [None])[0]
    dma_contenders = [f"dma-{b}" for b in args.backends]
    os.makedirs(args.out, exist_ok=True)

    start = time.monotonic()
    rows, shares, ran = [], [], set()
    for case in (c for c in CASES if c.name in args.cases):
        if args.deadline is not None and time.monotonic() - start > args.deadline:
            print(f"{case.name}: skipped, past the deadline")
            continue
        shape = shape_of(case, args)
        print(f"== {case.name}: {shape.label}", flush=True)
        if case.name == PLAN_CASE:
            shares = plan_shares(shape, device, args.backends)
        else:
            contenders = (dma_contenders[0], *case.baselines, *dma_contenders[1:])
            case_rows = run_benchmark([shape], device, contenders=contenders,
                                      modes=case.modes, reps=args.reps or case.reps)
            print(format_table(case_rows, case.baselines[0]), flush=True)
            rows += [dict(r, case=case.name) for r in case_rows]
        ran.add(case.name)

    if rows:
        write_csv(rows, os.path.join(args.out, "rows.csv"))
    table = verdicts(rows, shares, first, second, ran)
    write_csv(table, os.path.join(args.out, "targets.csv"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for s in shares:
        print(f"plan share {s['contender']}: plan {s['plan_us']:.1f} us of "
              f"{s['forward_us']:.1f} us forward GPU time {s['note']}".rstrip())
    print(f"\ndevice: {name}; {time.monotonic() - start:.0f} s; results in {args.out}")
    print(format_verdicts(table))
    if args.plot:
        plot_verdicts(table, args.plot, f"dma targets, {name}")
    return table


if __name__ == "__main__":
    main()
