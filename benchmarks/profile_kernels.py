"""Per-kernel GPU time of one dma forward+backward (torch.profiler), to see where time goes.

    python benchmarks/profile_kernels.py --seqlen 16384 --window 2048
    python benchmarks/profile_kernels.py --seqlen 131072 --seqlen-q 1 --forward-only
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import dma
from dma.benchmarking import Shape, make_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--seqlen-q", type=int, default=None, help="query rows (default: seqlen)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    shape = Shape(1, args.seqlen, args.heads, args.kv_heads, args.head_dim, args.window,
                  torch.bfloat16, seqlen_q=args.seqlen_q)
    q, k, v, kb = make_inputs(shape, "cuda")
    for t in (q, k, v, kb):
        t.requires_grad_(not args.forward_only)

    def step():
        o = dma.attention(q, k, v, key_bias=kb, window=args.window, causal=True,
                          backend=args.backend)
        if not args.forward_only:
            o.backward(torch.ones_like(o))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
