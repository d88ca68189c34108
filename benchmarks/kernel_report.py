"""What the compiler makes of the triton kernels, without a GPU.

    python benchmarks/kernel_report.py                        # every kernel, default configs
    python benchmarks/kernel_report.py --kernels fwd --override '{"num_stages": 5}'
    python benchmarks/kernel_report.py --kernels dq --dump /tmp/ir   # also write TTGIR, PTX

Compiles each kernel of the triton backend, with its launch configuration from
`triton_backend.CONFIGS` (plus --override), for a CUDA target (default compute capability 9.0)
at the benchmark shape (bf16, head dim 128, causal, key_bias; the DMA case for the candidate
kernels, consecutive keys for the dense ones; "fwd_masked" is the dense forward over an
explicit mask's listed tiles, with fwd_dense's settings) and prints, per kernel: shared
memory, registers and spilled bytes (ptxas), warpgroup MMA and older MMA instructions,
asynchronous copies (loads the pipeliner prefetches) and synchronous loads, integer divisions
inside the innermost (per-tile) loops, and the waits on asynchronous copies inside the loops (a wait
for 0 outstanding groups means nothing is in flight across tiles).
Integer arguments are specialised as the benchmark's are: strides and lengths divisible by 16.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Report on real compilations even when the caller's environment asks for the interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dma import triton_launch  # noqa: E402
from dma.backends import triton_backend, triton_kernels  # noqa: E402
from dma.backends.gpu_launch import LaunchArgs  # noqa: E402

REPORTED = ["fwd", "fwd_dense", "fwd_masked", "fwd_decode", "dq", "dkdv_candidates",
            "dkdv_keys"]
CONFIG_OF = {"fwd_masked": "fwd_dense"}  # reported rows launched with another's settings
FLOAT32_POINTERS = {"LSE", "DELTA", "DKB", "DAB"}
INDEX_POINTERS = {"END", "CAND", "COUNT", "FULL"}
BYTE_POINTERS = {"AM", "PAD"}
DIVISIBLE_INTS = {"seqlen_q", "seqlen_k", "causal_offset", "heads", "kv_heads", "split_slots"}


def kernel_setup(kernel: str, config: dict, head_dim: int, dtype: str):
    """(jit function, constexprs, pointer dtypes) of one reported kernel."""
    d_pad = LaunchArgs.padded_head_dim(head_dim)
    masked = kernel == "fwd_masked"  # an explicit mask and no key_bias
    common = dict(HEAD_DIM=head_dim, D_PAD=d_pad, DOT_PRECISION="ieee", CAUSAL=True,
                  HAS_KB=not masked, HAS_AB=False, HAS_AM=masked, HAS_PAD=False, SOFTCAP=False,
                  INTERVAL=kernel not in ("fwd_dense", "fwd_masked", "dkdv_keys"),
                  TILE_LIST=masked,
                  BLOCK_M=config.get("BLOCK_M", triton_backend.BLOCK_M),
                  BLOCK_N=config["BLOCK_N"], WIDE_OFFSETS=False)
    pointers = {"DK": "fp32", "DV": "fp32"} if kernel == "dkdv_candidates" else {}
    # the backend passes key_bias as float32 where keys are gathered
    pointers["KB"] = "fp32" if common["INTERVAL"] else dtype
    # Absent inputs point at q, as the backend passes them (LaunchArgs): code that a flag
    # leaves in place must compile with q's element type there.
    lists = common["INTERVAL"] or common["TILE_LIST"] or kernel == "dkdv_candidates"
    absent = dict(KB=not common["HAS_KB"], AB=not common["HAS_AB"], AM=not common["HAS_AM"],
                  PAD=not common["HAS_PAD"], END=not common["INTERVAL"], CAND=not lists,
                  COUNT=not lists, FULL=not lists)
    pointers.update({name: dtype for name, missing in absent.items() if missing})
    if kernel.startswith("fwd"):
        fn = triton_kernels._fwd_kernel
        common.update(HEADS_PER_PROG=config["STACK"], LAZY_RESCALE=config["LAZY_RESCALE"])
    elif kernel == "dq":
        fn = triton_kernels._bwd_dq_kernel
        common.update(HEADS_PER_PROG=config["STACK"], NEED_DAB=False, DAB_REDUCED=False,
                      DAB_ROWS=False, DAB_KEYS=False)
    elif kernel == "dkdv_candidates":
        fn = triton_kernels._bwd_dkdv_candidates_kernel
        common.update(ROWS_PER_PROGRAM=config["ROWS"], NEED_DKB=True)
    else:
        fn = triton_kernels._bwd_dkdv_keys_kernel
        common.update(NEED_DKB=True)
    constexprs = {name: value for name, value in common.items() if name in fn.arg_names}
    return fn, constexprs, pointers


def compile_kernel(fn, constexprs: dict, pointers: dict, dtype: str, arch: int,
                   num_warps: int, num_stages: int, maxnreg=None):
    signature, attrs = {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name[0].isupper():  # tensors are the upper-case arguments
            kind = ("fp32" if name in FLOAT32_POINTERS else "i32" if name in INDEX_POINTERS
                    else "u8" if name in BYTE_POINTERS else dtype)
            signature[name] = "*" + pointers.get(name, kind)
        elif name in ("scale", "softcap"):
            signature[name] = "fp32"
            continue
        else:
            signature[name] = "i32"
            if not (name.startswith("s") or name in DIVISIBLE_INTS):  # strides, lengths
                continue
        attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    # run_kernel's default options (fp fusion); maxnreg: a register cap (None: ptxas's)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(triton_launch.DEFAULT_OPTIONS, num_warps=num_warps,
                                       num_stages=num_stages, maxnreg=maxnreg))


def ptxas_candidates() -> list:
    """ptxas binaries to try: Triton's own (some releases ship one too old for the PTX they
    emit, and a newer one beside it), then the one on PATH."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [os.environ.get("TRITON_PTXAS_PATH"), folder / "ptxas", folder / "ptxas-blackwell",
             shutil.which("ptxas")]
    return [str(path) for path in found if path and Path(path).exists()]


def ptxas_report(ptx: str, arch: int) -> str:
    """Registers and spilled bytes, from the first ptxas that assembles the PTX."""
    arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        for ptxas in ptxas_candidates():
            out = subprocess.run([ptxas, f"-arch={arch_name}", "-v", str(source),
                                  "-o", str(Path(folder) / "kernel.cubin")],
                                 capture_output=True, text=True, check=False)
            text = out.stderr + out.stdout
            regs = re.search(r"Used (\d+) registers", text)
            if regs:
                spill = re.search(r"(\d+) bytes spill stores", text)
                return f"{regs.group(1):>4} {spill.group(1) if spill else '0':>6}"
    return f"{'?':>4} {'?':>6}"


_INTEGER_DIVISION = re.compile(r"arith\.(divsi|divui|remsi|remui|floordivsi|ceildivsi) ")


def innermost_loop_divisions(ttgir: str) -> int:
    """Integer divisions and remainders inside innermost loops (the per-tile loops) of a
    TTGIR module. The compiler may not hoist a division out of a loop, so one there runs
    every tile: the dense forward's per-tile head division showed up as one here."""
    stack = []  # per open region: None (not a loop) or [divisions, has an inner loop]
    count = 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}") and stack:
            closed = stack.pop()
            if closed is not None and not closed[1]:
                count += closed[0]
        if re.search(r"\bscf\.(for|while)\b", text) and text.endswith("{"):
            for region in stack:
                if region is not None:
                    region[1] = True
            stack.append([0, False])
        elif text.endswith("{"):
            stack.append(None)
        elif _INTEGER_DIVISION.search(text):
            loops = [region for region in stack if region is not None]
            if loops:
                loops[-1][0] += 1
    return count


def report_line(kernel: str, compiled, arch: int) -> str:
    ttgir = compiled.asm["ttgir"]
    waits = re.findall(r"ttg\.async_wait .*?num = (\d+)", ttgir)
    return (f"{kernel:16} {compiled.metadata.shared // 1024:6} KiB "
            f"{ptxas_report(compiled.asm['ptx'], arch)} "
            f"{ttgir.count('ttng.warp_group_dot '):6} {ttgir.count('tt.dot '):5} "
            f"{ttgir.count('async_copy_global_to_local'):6} "
            f"{len(re.findall(r'= tt.load ', ttgir)):5} {innermost_loop_divisions(ttgir):4}   "
            f"{','.join(waits) or '-'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=REPORTED, choices=REPORTED)
    parser.add_argument("--override", type=json.loads, default={},
                        help="settings over each kernel's configuration, a JSON object")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dump", default=None, help="folder for each kernel's TTGIR and PTX")
    args = parser.parse_args(argv)
    print(f"target sm_{args.arch}, {args.dtype}, head dim {args.head_dim}")
    print(f"{'kernel':16} {'shared':>10} {'regs':>4} {'spill':>6} {'wgmma':>6} {'mma':>5} "
          f"{'async':>6} {'sync':>5} {'div':>4}   async waits (outstanding groups)")
    lines = []
    for kernel in args.kernels:
        d_pad = LaunchArgs.padded_head_dim(args.head_dim)
        config = dict(triton_backend.kernel_config(CONFIG_OF.get(kernel, kernel), d_pad),
                      **args.override)
        fn, constexprs, pointers = kernel_setup(kernel, config, args.head_dim, args.dtype)
        compiled = compile_kernel(fn, constexprs, pointers, args.dtype, args.arch,
                                  config["num_warps"], config["num_stages"],
                                  config.get("maxnreg"))
        if args.dump:
            folder = Path(args.dump)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{kernel}.ttgir").write_text(compiled.asm["ttgir"])
            (folder / f"{kernel}.ptx").write_text(compiled.asm["ptx"])
        line = report_line(kernel, compiled, args.arch)
        print(line, flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
