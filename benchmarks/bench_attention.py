"""dma against dense SDPA (cuDNN, flash) and FlexAttention, side by side in one run.

    python benchmarks/bench_attention.py --seqlens 4096 16384 --window 2048
    python benchmarks/bench_attention.py --device cpu --seqlens 2048 8192 --window 512 \
        --heads 8 --kv-heads 8 --head-dim 64 --dtype float32
    python benchmarks/bench_attention.py --seqlen-q 1 --seqlens 131072 --modes fwd --cuda-graph

Prints a table of median times and ratios to the dense baseline (cuDNN on GPU, SDPA on CPU)
and writes the rows to CSV (--csv).
"""

import argparse

import torch

from dma.benchmarking import Shape, format_table, run_benchmark, write_csv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=2048, help="0 = no window")
    parser.add_argument("--seqlen-q", type=int, default=None,
                        help="query length (default: the sequence length; 1 = decoding)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--backend", default=None, help="dma backend (default: automatic)")
    parser.add_argument("--contenders", nargs="+", default=None,
                        help="dma, dma-<backend>, sdpa, sdpa-cudnn, sdpa-flash, sdpa-math, flex "
                             "(the second one listed is the ratio baseline); a dma contender "
                             "ending in :eager-plan builds its selection plans without CUDA "
                             "graphs (DMA_PLAN_GRAPHS=0)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--csv", default="bench-results.csv")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each contender's forward from a CUDA graph (device time "
                             "without host time, as serving stacks run decoding steps)")
    args = parser.parse_args()
    device = torch.device(args.device)
    contenders = args.contenders or (
        ["dma", "sdpa-cudnn", "sdpa-flash", "flex"] if device.type == "cuda" else ["dma", "sdpa"])
    dtype = getattr(torch, args.dtype)
    window = args.window or None
    shapes = [Shape(args.batch, s, args.heads, args.kv_heads, args.head_dim, window, dtype,
                    args.seqlen_q) for s in args.seqlens]
    rows = run_benchmark(shapes, device, contenders=tuple(contenders), backend=args.backend,
                         modes=tuple(args.modes), reps=args.reps, cuda_graph=args.cuda_graph)
    write_csv(rows, args.csv)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; csv: {args.csv}")
    print(format_table(rows, contenders[1 if len(contenders) > 1 else 0]))


if __name__ == "__main__":
    main()
