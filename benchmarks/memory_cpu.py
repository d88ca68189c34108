"""Peak resident memory of one forward+backward on the CPU, above its inputs.

    python benchmarks/memory_cpu.py --seqlens 8192 32768 --window 512 --backend numba

Each length runs in a fresh process: compile and warm up on a small problem, create the
inputs, then report the growth of the peak resident set size (ru_maxrss) over one
forward+backward. Linear growth in the tokens means no O(S^2) buffer anywhere.
"""

import argparse
import subprocess
import sys

SCRIPT = r"""
import json, resource, torch, dma

def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def inputs(s):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(1, s, {heads}, {dim}, generator=g) for _ in range(3)]
    t.append(torch.randn(1, {heads}, s, generator=g))
    return [x.requires_grad_(True) for x in t]

def step(q, k, v, kb):
    o = dma.attention(q, k, v, key_bias=kb, window={window}, causal=True, backend="{backend}")
    o.backward(torch.ones_like(o))

step(*inputs(256))  # compiles and warms up
tensors = inputs({seqlen})
before = rss_mib()
step(*tensors)
print(json.dumps(dict(seqlen={seqlen}, inputs_mib=sum(t.numel() * 4 for t in tensors) / 2**20,
                      peak_above_inputs_mib=rss_mib() - before)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()
    for seqlen in args.seqlens:
        code = SCRIPT.format(seqlen=seqlen, window=args.window, heads=args.heads,
                             dim=args.head_dim, backend=args.backend)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
