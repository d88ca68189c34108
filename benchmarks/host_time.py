"""Host time per eager dma.attention call (GPU), and where it goes (cProfile).

    python benchmarks/host_time.py                      # decoding 1 x 131072 and a 4k forward
    python benchmarks/host_time.py --cases 16384 --top 30

Each case runs `--calls` forward calls without synchronising: the host time per call is how
long the loop takes to issue them, the wall time includes the GPU finishing. A call whose
host time exceeds its GPU time is host-bound (the decoding and short-sequence rows of the
benchmark are). Then the same calls under cProfile, functions by own time.
"""

import argparse
import cProfile
import pstats

import torch

import dma
from dma.benchmarking import Shape, host_and_wall_ms, make_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1x131072", "4096"],
                        help="query rows x keys, or tokens for both")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--top", type=int, default=20, help="functions listed (0: none)")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    for case in args.cases:
        sq, _, sk = case.partition("x")
        sq, sk = int(sq), int(sk or sq)
        shape = Shape(1, sk, 32, 8, 128, args.window, torch.bfloat16,
                      seqlen_q=None if sq == sk else sq)
        inputs = make_inputs(shape, "cuda")

        def step(q=inputs[0], k=inputs[1], v=inputs[2], kb=inputs[3]):
            with torch.no_grad():
                dma.attention(q, k, v, key_bias=kb, window=args.window, causal=True,
                              backend=args.backend)

        host, wall = host_and_wall_ms(step, args.calls)
        print(f"{shape.label}: host {host:.3f} ms per call, wall {wall:.3f} ms per call")
        if args.top:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
