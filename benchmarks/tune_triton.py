"""Time launch configurations of the triton kernels on one DMA shape (GPU).

    python benchmarks/tune_triton.py --seqlen 16384 --window 2048
    python benchmarks/tune_triton.py --seqlen 16384 --window 0    # dense tiles, no window
    python benchmarks/tune_triton.py --kernels fwd --trials '{"num_stages": 4}' '{"BLOCK_N": 64}'

For each kernel it varies one configuration at a time around the defaults in
dma/backends/triton_backend.py (CONFIGS), over the alternatives of
dma/backends/triton_tuning.py (SEARCH, which DMA_TRITON_AUTOTUNE=1 also times at run time),
and prints the forward or forward+backward time, so a better default can be read off and
written back. `--trials` times given settings (each a JSON object over the defaults) instead.
"""

import argparse
import itertools
import json

import torch

import dma
from dma.backends import triton_backend
from dma.backends.triton_tuning import SEARCH
from dma.benchmarking import Shape, make_inputs, median_ms

WINDOW_KERNELS = ["fwd", "dq", "dkdv_candidates"]
DENSE_KERNELS = ["fwd_dense", "dq", "dkdv_keys"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=2048, help="0 = no window")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help=f"default: {WINDOW_KERNELS} with a window, else {DENSE_KERNELS}")
    parser.add_argument("--full-grid", action="store_true", help="every combination")
    parser.add_argument("--trials", nargs="+", type=json.loads, default=None,
                        help="settings to time, each a JSON object over the defaults")
    args = parser.parse_args()
    window = args.window or None
    kernels = args.kernels or (WINDOW_KERNELS if window else DENSE_KERNELS)
    shape = Shape(1, args.seqlen, 32, 8, 128, window, torch.bfloat16)
    q, k, v, kb = make_inputs(shape, "cuda")
    device = torch.device("cuda")

    def run_fwd():
        with torch.no_grad():
            dma.attention(q, k, v, key_bias=kb, window=window, causal=True,
                          backend="triton")

    leaves = [t.requires_grad_(True) for t in (q, k, v, kb)]

    def run_train():
        for t in leaves:
            t.grad = None
        o = dma.attention(q, k, v, key_bias=kb, window=window, causal=True,
                          backend="triton")
        o.backward(torch.ones_like(o))

    print(f"device: {torch.cuda.get_device_name()}  shape: {shape.label}")
    for kernel in kernels:
        run = run_fwd if kernel.startswith("fwd") else run_train
        space = SEARCH[kernel]
        base = triton_backend.CONFIGS[kernel]
        if args.trials:
            trials = [{}] + args.trials
        elif args.full_grid:
            trials = [dict(zip(space, values)) for values in itertools.product(*space.values())]
        else:
            trials = [{}] + [{name: value} for name, values in space.items() for value in values
                             if value != base.get(name)]
        for trial in trials:
            triton_backend.OVERRIDES[kernel] = trial
            try:
                ms = f"{median_ms(run, device, 2, 5):9.3f}"
            except Exception as exc:  # out of resources and the like
                ms = f"{type(exc).__name__}"
            print(f"{kernel:16} {str(trial or 'default'):48} {ms}", flush=True)
        triton_backend.OVERRIDES.pop(kernel, None)


if __name__ == "__main__":
    main()
