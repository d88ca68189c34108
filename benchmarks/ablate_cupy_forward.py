"""Where the cupy warpgroup forward's time goes: its GPU time per call with one stage left
out, and against the window (tiles per block), on one DMA shape (bf16, B1, H32/8, D128).

    python benchmarks/ablate_cupy_forward.py                      # every variant, 16k
    python benchmarks/ablate_cupy_forward.py --variants base nosoftmax --windows 1024 4096
    python benchmarks/ablate_cupy_forward.py --check              # compile only (nvcc)

Each variant is the kernel source with one stage taken out, compiled from a copy of the
sources (DMA_CUPY_SOURCES names the copy to the backend; the package is untouched, and a
DMA_CUPY_SOURCES set before the run is the copy that the variants start from):

* `base`: the kernel as it is;
* `nosoftmax`: no scores, keep tests or softmax (the products' outputs go straight into
  P V; the producer then stages no key facts either);
* `nogemm`: no products (the softmax runs on the previous tile's values);
* `nocopy`: the producer copies no K or V rows (it still loads the key ids and facts).

A variant's time against `base` bounds what its stage costs where nothing overlaps it
(leaving a stage out also frees what waited on it). The window sweep runs `base` only: the
kernel's time against tiles per block gives the cost of a tile and, extrapolated to no
tiles, what each block costs besides its tiles. Outputs of the variants are wrong by
design; only their times are printed. Kernel times come from torch.profiler, rounds
alternating the variants.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

VARIANTS = ("base", "nosoftmax", "nogemm", "nocopy")
KERNEL = "dma_forward_wgmma"


def _forward_span(text: str) -> tuple:
    """Where the warpgroup forward's definition starts and ends in dma_attention.cuh."""
    start = text.index(f"{KERNEL}(const Params p)")
    return start, text.index("__global__", start)


def _cut(body: str, pattern: str, replacement: str, count: int, variant: str) -> str:
    body, found = re.subn(pattern, replacement, body, flags=re.S)
    if found != count:
        raise SystemExit(f"{variant}: expected {count} matches of {pattern!r} in {KERNEL}, "
                         f"found {found} (the kernel changed: update this script)")
    return body


def variant_sources(variant: str, source_dir: Path, out: Path | None = None) -> Path:
    """A copy of the kernel sources with `variant`'s stage taken out of the forward, in
    `out` (default: a new temporary folder)."""
    out = Path(tempfile.mkdtemp(prefix=f"dma_{variant}_")) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    for path in source_dir.glob("*.cuh"):
        shutil.copy(path, out / path.name)
    header = out / "dma_attention.cuh"
    text = header.read_text()
    start, end = _forward_span(text)
    body = text[start:end]
    if variant == "nosoftmax":
        body = _cut(body, r"with_keep_test<SOFTCAP, true>\(.*?\}\);", "", 1, variant)
        body = _cut(body, r"return softmax_probabilities\(.*?\);", "return false;", 1, variant)
    elif variant == "nogemm":
        body = _cut(body, r"wgmma_rows_by_rows<[^>]*>\(s\[0\].*?\);", "", 1, variant)
        body = _cut(body, r"wgmma_registers_by_rows<[^>]*>\(o\[0\], pa,.*?\);", "", 1, variant)
    elif variant == "nocopy":
        body = _cut(body, r"copy_rows_of_lanes<E, BLOCK_N, D_PAD>\([kv]_s.*?\);", "", 2,
                    variant)
    elif variant != "base":
        raise SystemExit(f"unknown variant {variant} (known: {', '.join(VARIANTS)})")
    header.write_text(text[:start] + body + text[end:])
    return out


def check_compiles(variants, source_dir: Path) -> None:
    """Compile each variant's bf16 head-dim-128 forward with nvcc for sm_90a."""
    for variant in variants:
        folder = variant_sources(variant, source_dir)
        unit = folder / "unit.cu"
        unit.write_text('#include "dma_attention.cuh"\n'
                        f"template __global__ void {KERNEL}<BF16, 128, 128, false>"
                        "(const Params);\n")
        result = subprocess.run(["nvcc", "-std=c++17", "-cubin", "-arch=sm_90a", "-Xptxas",
                                 "-v", "-I", str(folder), str(unit), "-o",
                                 str(folder / "unit.cubin")], capture_output=True, text=True)
        usage = [line.strip() for line in result.stderr.splitlines() if "Used" in line]
        print(f"{variant:10} exit {result.returncode}  {' '.join(usage)}")
        if result.returncode:
            raise SystemExit(result.stderr)


def kernel_us(seqlen: int, window: int, calls: int = 10) -> float:
    """GPU us per call of the forward kernel on the benchmark shape."""
    import dma
    from dma.benchmarking import Shape, kernel_us_per_call, make_inputs

    shape = Shape(1, seqlen, 32, 8, 128, window, torch.bfloat16)
    q, k, v, kb = make_inputs(shape, "cuda")

    def call():
        return dma.attention(q, k, v, key_bias=kb, window=window, causal=True,
                             backend="cupy")

    with torch.no_grad():
        per_kernel = kernel_us_per_call(call, calls)
    if KERNEL not in per_kernel:
        raise SystemExit(f"{KERNEL} did not run (is this a compute capability 9.0 GPU?): "
                         f"{sorted(per_kernel)}")
    return per_kernel[KERNEL]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--windows", nargs="*", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--window", type=int, default=2048, help="of the variants' runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compile the variants and stop")
    args = parser.parse_args()

    from tqdm import tqdm

    from dma.backends import cupy_kernels

    source_dir = cupy_kernels.source_dir()
    if args.check:
        check_compiles(args.variants, source_dir)
        return
    folders = {variant: variant_sources(variant, source_dir) for variant in args.variants}

    def use(folder: Path):  # compile (or load) the kernels from `folder` from now on
        os.environ["DMA_CUPY_SOURCES"] = str(folder)

    times = {variant: [] for variant in args.variants}
    steps = [(r, v) for r in range(args.rounds) for v in args.variants]
    for _, variant in tqdm(steps, desc="variants"):
        use(folders[variant])
        times[variant].append(kernel_us(args.seqlen, args.window))
    use(folders.get("base") or variant_sources("base", source_dir))
    sweep = {w: [kernel_us(args.seqlen, w) for _ in range(args.rounds)]
             for w in tqdm(args.windows, desc="windows")}

    print(f"device: {torch.cuda.get_device_name()}  seqlen {args.seqlen}, bf16, H32/8, D128")
    print(f"{'variant':10} {'window':>6}  forward kernel us per call (each round)")
    for variant, values in times.items():
        print(f"{variant:10} {args.window:6d}  " + " / ".join(f"{t:.1f}" for t in values))
    for window, values in sweep.items():
        tiles = -(-(window + 128) // 128)  # a late block's candidate tiles
        print(f"{'base':10} {window:6d}  " + " / ".join(f"{t:.1f}" for t in values)
              + f"   ({tiles} tiles per late block)")


if __name__ == "__main__":
    main()
