"""Command line: `python -m dma info | demo | train`."""

from __future__ import annotations

import argparse
import sys

import torch


def cmd_info(_args) -> int:
    import dma

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "not available"
    print(f"dma {dma.__version__}, torch {torch.__version__}, CUDA: {cuda}")
    print(f"{'backend':8} {'usable':7} {'devices':10} {'dtypes':24} {'bwd':4} {'compile':8} "
          "reasons / notes")
    for name, backend in dma.backends().items():
        reasons = backend.reasons(None)
        cap = backend.capabilities
        status = "no" if reasons else "yes"
        detail = "; ".join(reasons) if reasons else "; ".join(cap.notes) or "ready"
        dtypes = ",".join(sorted(str(d).replace("torch.", "").replace("float", "f")
                                 for d in cap.dtypes))
        print(f"{name:8} {status:7} {','.join(sorted(cap.devices)):10} {dtypes:24} "
              f"{'yes' if cap.backward else 'no':4} {'yes' if cap.torch_compile else 'no':8} "
              f"{detail}")
    return 0


def cmd_demo(args) -> int:
    from .benchmarking import Shape, format_table, run_benchmark

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        dtype, seqlens, heads, kv_heads, head_dim = torch.bfloat16, (4096, 16384), 32, 8, 128
    else:
        dtype, seqlens, heads, kv_heads, head_dim = torch.float32, (2048, 8192), 8, 8, 64
    shapes = [Shape(1, s, heads, kv_heads, head_dim, args.window, dtype) for s in seqlens]
    rows = run_benchmark(shapes, device, contenders=("dma", "sdpa"), reps=args.reps)
    print(f"dma (window {args.window}, key_bias, causal) vs dense causal SDPA on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(format_table(rows, "sdpa"))
    return 0


def cmd_train(args) -> int:
    from .train import format_rows, run

    rows = run(args)
    print(f"MQAR, {args.pairs} pairs, {args.queries} queries, window {args.window}, "
          f"{args.steps} steps (accuracy on 512 fresh sequences)")
    print(format_rows(rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backend table for this machine").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="time dma against dense attention on this device")
    demo.add_argument("--device", default=None)
    demo.add_argument("--window", type=int, default=512)
    demo.add_argument("--reps", type=int, default=3)
    demo.set_defaults(func=cmd_demo)
    from .train import add_arguments

    train = sub.add_parser("train", help="train dense / sliding-window / DMA models on MQAR")
    add_arguments(train)
    train.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
