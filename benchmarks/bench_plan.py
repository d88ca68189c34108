"""Time the selection plan (tau, key intervals, candidate lists) on its own.

    python benchmarks/bench_plan.py --seqlens 16384 131072 --window 2048
    python benchmarks/bench_plan.py --seqlens 2048 4096 8192 --sorts   # GPU

Prints the plan time next to cuDNN dense causal forward on the same shape (GPU) so the
"plan under 10% of the attention forward" budget can be read off directly. With --sorts,
instead: the triton plan's key intervals with each of its sorts (selection.TRITON_SORTS),
GPU time (profiler) and host time per call (a loop, no synchronisation).
"""

import argparse

import torch

import dma.selection as selection
from dma.benchmarking import (
    Shape,
    host_and_wall_ms,
    kernel_us_per_call,
    make_inputs,
    median_ms,
    sdpa_contender,
)
from dma.selection import build_interval_plan
from dma.validation import validate


def _gpu_us(fn, reps: int = 20) -> float:
    return sum(kernel_us_per_call(fn, reps).values())


def compare_sorts(problem, inputs, seqlen: int, plan_heads: int):
    """The key intervals (sort, ranks, thresholds, intervals) with each sort path."""
    scores = selection.key_selection_scores(problem, inputs, 1, plan_heads)
    scores = scores.reshape(plan_heads, seqlen).contiguous()
    results, line = {}, f"{seqlen:8d}"
    for sort in selection.TRITON_SORTS:
        if sort == "one program" and seqlen > 16384:  # would not fit one program's registers
            line += f" {'-':>21} {'-':>8}"
            continue

        def intervals(sort=sort):
            return selection._key_intervals_triton(problem, scores, None, sort=sort)

        results[sort] = intervals()
        line += f" {_gpu_us(intervals):21.1f} {1e3 * host_and_wall_ms(intervals, 200)[0]:8.1f}"
    first, *others = results.values()
    same = all(torch.equal(a, b) for other in others for a, b in zip(first, other))
    print(line + ("  same" if same else "  DIFFERENT"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sorts", action="store_true",
                        help="compare the triton plan's two sort paths (GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    if args.sorts:
        print(f"{'seqlen':>8}" + "".join(f" {sort + ': GPU us':>21} {'host us':>8}"
                                         for sort in selection.TRITON_SORTS))
        for seqlen in args.seqlens:
            shape = Shape(1, seqlen, args.heads, args.kv_heads, args.head_dim, args.window,
                          dtype)
            q, k, v, kb = make_inputs(shape, device)
            problem, inputs = validate(q, k, v, key_bias=kb, window=args.window, causal=True)
            compare_sorts(problem, inputs, seqlen, args.kv_heads)
        return
    print(f"{'seqlen':>8} {'block_m':>8} {'plan ms':>9} {'dense fwd ms':>13} {'plan/dense':>11}"
          f" {'max cand':>9} {'plan MiB':>9}")
    for seqlen in args.seqlens:
        shape = Shape(1, seqlen, args.heads, args.kv_heads, args.head_dim, args.window, dtype)
        q, k, v, kb = make_inputs(shape, device)
        problem, inputs = validate(q, k, v, key_bias=kb, window=args.window, causal=True)
        dense = float("nan")
        if device.type == "cuda":
            dense = median_ms(torch.no_grad()(sdpa_contender((q, k, v, kb), "cudnn")), device,
                              3, 10)
        for block_m in args.block_m:
            # as the triton backend builds it: fully kept candidates first
            def build(problem=problem, inputs=inputs, block_m=block_m):
                return build_interval_plan(problem, inputs, block_m, full_first=True)

            plan_ms = median_ms(build, device, 2, 10)
            plan = build()
            size = sum(t.numel() * t.element_size() for t in (
                plan.key_first_row, plan.key_end_row, plan.candidates, plan.candidate_count,
                plan.full_count))
            print(f"{seqlen:8d} {block_m:8d} {plan_ms:9.3f} {dense:13.3f} "
                  f"{plan_ms / dense:11.3f} {int(plan.candidate_count.max()):9d} "
                  f"{size / 2**20:9.1f}")


if __name__ == "__main__":
    main()
