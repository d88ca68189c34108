"""Triton backend: the GPU path (kernels in triton_kernels.py).

The DMA case walks each query block's candidate keys from the selection plan (at most
window + BLOCK_M of them), so work follows the kept pairs rather than the causal triangle.
Explicit masks and biases walk dense key tiles with broadcast dims read at stride 0.

Backward: dq walks the same tiles as the forward. dk/dv come from one of two kernels:
* DMA case (default): candidate tiles of each query block, added with float32 atomics;
* dense case, or deterministic mode (`torch.use_deterministic_algorithms(True)` or
  DMA_DETERMINISTIC=1): tiles of consecutive keys walking the rows that may keep them, one
  writer per output element.

Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (float32, float16), which is how
CI exercises them without a GPU.
"""

from __future__ import annotations

import os

import torch

from ..selection import coarse_candidate_lists
from ..triton_launch import run_kernel
from ..validation import Inputs, Problem
from . import triton_tuning
from .base import Backend, Capabilities, missing_packages, new_output
from .gpu_launch import (
    LaunchArgs,
    backward_buffers,
    bias_grad_strides,
    block_list_args,
    candidate_key_split,
    cdiv,
    device_capability,
    finish_backward,
    multiprocessors,
    next_pow2,
    shared_memory_limit,
)

BLOCK_M = 64  # query rows per program; also the plan's block size
DECODE_ROWS = 16  # up to this many query rows the forward takes the "fwd_decode" config

# Launch configuration per kernel: BLOCK_N (keys per tile), num_warps and num_stages; the
# forward and dq stack up to STACK heads of a kv group per program; the candidate dk/dv kernel
# walks ROWS rows per program (coarse blocks: fewer atomic adds, one per candidate key and
# block, at the cost of rows that keep few keys of a tile) in tiles of BLOCK_M rows.
# "fwd" walks gathered candidates (the DMA case); "fwd_dense" walks consecutive keys, where
# wider tiles and a deeper pipeline pay (used when it stacks all STACK heads and fits the
# device's shared memory, else "fwd").
# `benchmarks/tune_triton.py` times alternatives; OVERRIDES lets it (or a user) replace them.
CONFIGS = {
    # Timed with benchmarks/tune_triton.py on an H200 (bf16, D=128, 16k tokens; window 2048
    # for the candidate kernels, none for the dense ones); docs/performance.md has the trials.
    # Deeper pipelines for the gathered forward and dq (num_stages=5: two K/V tiles in
    # flight instead of one) and 8-warp programs were measured slower there, so these stay
    # at 4 warps and 3 (forward) or 2 (dq) stages.
    # LAZY_RESCALE: rescale the output accumulator only in tiles where some row's max grew
    # by more than 2^8 (see _fwd_kernel); it pays where key tiles are narrow (32 keys), and
    # cost time on the 64-key dense tiles.
    "fwd": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "STACK": 2, "LAZY_RESCALE": True},
    # Dense tiles (no window) now take the gathered forward's settings: on an H200 they ran
    # 6.75 ms against 6.9-7.2 for the former 64-key, 8-warp, 4-stage, 4-head tiles (chosen
    # on an H100 before the lazy rescale); 128-key tiles spill.
    # Explicit masks walk listed live tiles with the same settings: there the per-pair mask
    # test's addresses make the two stacked heads' tile spill (584 bytes, kernel_report.py),
    # yet 8 warps (no spill) were slower: 1.56 against 1.29 ms for 16 packed documents at
    # 16k (H100, ab_configs.py --docs 16), and so were one head per program (1.52) and
    # 64-key tiles (1.41).
    "fwd_dense": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "STACK": 2,
                  "LAZY_RESCALE": True},
    # Decoding (at most DECODE_ROWS query rows): 16-row blocks, so that a program's tile is
    # the kv group's query heads rather than 64 rows of which one is real, and the key slots
    # split over SPLITS programs (0: enough for two programs per multiprocessor).
    "fwd_decode": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "STACK": 4,
                   "SPLITS": 0, "LAZY_RESCALE": False},
    # dq: 8 warps held to 128 registers (maxnreg), so that two programs of 8 warps share a
    # multiprocessor: 7.93 against 8.19 ms forward+backward for the former 4 warps at 255
    # registers (16k, window 2048, H200, one run), though it spilled about 240 bytes then
    # (56 under Triton 3.6 since first rows come from causality, kernel_report.py).
    "dq": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "STACK": 2, "maxnreg": 128},
    # dk/dv tiles are key-major: the key tile is every product's M dimension, which Hopper's
    # warpgroup MMA needs (at least 64 per warpgroup: 128 keys over 8 warps); the row tiles
    # they walk are consecutive, so Triton's pipeliner prefetches them.
    # ROWS=1024: 8.74 ms forward+backward against 9.35 for 512 (16k, window 2048, H200).
    "dkdv_candidates": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3,
                        "ROWS": 1024},
    "dkdv_keys": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
}
# Settings that differ for 256-dim tiles: dq's register cap would spill 2284 bytes there
# (kernel_report.py), so it keeps 4 warps and the compiler's own register count.
WIDE_HEAD_CONFIGS = {"dq": {"num_warps": 4, "maxnreg": None}}
OVERRIDES: dict = {}


def kernel_config(kernel: str, d_pad: int) -> dict:
    """The launch configuration of one kernel for a padded head dim."""
    config = dict(CONFIGS[kernel])
    if d_pad > 128:  # 256-dim tiles: smaller key tiles, no stacking, shallow pipeline
        config.update(BLOCK_N=32, num_stages=1)
        if "STACK" in config:
            config["STACK"] = 1
        config.update(WIDE_HEAD_CONFIGS.get(kernel, {}))
    config.update(OVERRIDES.get(kernel, {}))
    if interpreter_mode():  # the interpreter is slow on big tiles and ignores the rest
        config.update(BLOCK_N=16, num_warps=1, num_stages=1)
        if "ROWS" in config:
            config["ROWS"] = 128
    return config


def forward_config(launch: LaunchArgs, problem: Problem) -> tuple[str, dict]:
    """Which forward configuration ("fwd_decode", "fwd_dense" or "fwd") and its settings,
    BLOCK_M and STACK (the most query heads stacked per program) included."""
    d_pad = launch.dims["D_PAD"]
    if problem.seqlen_q <= DECODE_ROWS:  # one block, so it reads the plan's first block
        return "fwd_decode", kernel_config("fwd_decode", d_pad)
    if not launch.flags["INTERVAL"] and not interpreter_mode():
        config = kernel_config("fwd_dense", d_pad)
        stacked = launch.heads_per_program(config["STACK"])
        limit = shared_memory_limit(problem.device)
        if stacked == config["STACK"] and limit is not None and \
                _forward_shared_bytes(config, stacked, d_pad, problem) <= limit:
            return "fwd_dense", dict(config, BLOCK_M=BLOCK_M)
    return "fwd", dict(kernel_config("fwd", d_pad), BLOCK_M=BLOCK_M)


_fitted: dict = {}  # (kernel, device, dtype, head dim, config) -> a config that fits


def run_fitting(kernel: str, problem: Problem, config: dict, run) -> None:
    """run(config), with fewer pipeline stages (then narrower key tiles) while the compiled
    kernel needs more shared memory than the device has (float32 inputs, smaller GPUs).
    Triton raises OutOfResources before the launch, so a failed try wrote nothing."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, problem.device, problem.dtype, problem.head_dim,
           tuple(sorted(config.items())))
    trial = _fitted.get(key, config)
    while True:
        try:
            run(trial)
        except OutOfResources:
            trial = _smaller_config(trial)
            if trial is None:
                raise
            continue
        _fitted[key] = trial
        return


def _smaller_config(config: dict):
    """One step down in shared memory: a stage less, else half the key tile; None at the end."""
    if config.get("num_stages", 1) > 1:
        return dict(config, num_stages=config["num_stages"] - 1)
    if config.get("BLOCK_N", 16) > 16:
        return dict(config, BLOCK_N=config["BLOCK_N"] // 2)
    return None


def tuned(kernel: str, problem: Problem, launch: LaunchArgs, config: dict, trial) -> dict:
    """`config`, or with DMA_TRITON_AUTOTUNE=1 the fastest alternative (triton_tuning.py)."""
    if not triton_tuning.enabled():
        return config
    key = triton_tuning.tuning_key(kernel, problem, launch.flags, launch.dims["D_PAD"])
    return triton_tuning.choose(kernel, key, config, trial, problem.device)


def key_splits(problem: Problem, plan, programs: int, config: dict) -> tuple[int, int]:
    """(splits, slots per split) of the forward's key slots. Only decoding splits: its few
    programs would otherwise leave most multiprocessors idle."""
    requested = config.pop("SPLITS", 1)
    block_n = config["BLOCK_N"]
    slots = plan.candidates.shape[-1] if plan is not None else problem.seqlen_k
    tiles = max(1, cdiv(slots, block_n))
    if requested == 0:
        requested = cdiv(2 * multiprocessors(problem.device), programs)
    tiles_per_split = cdiv(tiles, max(1, min(requested, tiles)))
    splits = cdiv(tiles, tiles_per_split)
    if splits == 1:
        return 1, 2**30
    return splits, tiles_per_split * block_n


def _launch_forward(problem: Problem, launch: LaunchArgs, plan, config: dict, out, lse):
    """The forward kernel with one configuration (and, when it splits key slots, the
    combine kernel), writing `out` and `lse`."""
    kern = _kernels()
    config = dict(config)
    stacked = launch.heads_per_program(config.pop("STACK"))
    launch = launch.with_live_tiles(config["BLOCK_M"], config["BLOCK_N"])
    b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
    grid = (cdiv(sq, config["BLOCK_M"]), b * h // stacked)
    splits, split_slots = key_splits(problem, plan, grid[0] * grid[1], config)
    if splits > 1:  # partial results in float32, merged below
        o_to = new_output((splits, b, sq, h, d), torch.float32, problem.device)
        lse_to = new_output((splits, b, h, sq), torch.float32, problem.device)
    else:
        o_to, lse_to = out[None], lse[None]
    run_kernel(kern._fwd_kernel, (*grid, splits),
        launch.q, launch.k, launch.v, o_to, lse_to, *launch.qkv,
        o_to.stride(1), o_to.stride(2), o_to.stride(3), lse_to.stride(1), lse_to.stride(2),
        *launch.masks(), *launch.candidates, launch.full_count,
        *launch.sizes, h, problem.group_size, launch.scale, launch.softcap,
        split_slots, o_to.stride(0) if splits > 1 else 0, lse_to.stride(0) if splits > 1 else 0,
        **launch.dims, **launch.flags,
        DOT_PRECISION=_dot_precision(problem.dtype), HEADS_PER_PROG=stacked,
        WIDE_OFFSETS=launch.wide_offsets, **config,
    )
    if splits > 1:
        run_kernel(kern._combine_splits_kernel, (b * sq * h,),
            o_to, lse_to, out, lse, splits, *o_to.stride()[:4], *lse_to.stride()[:3],
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            sq, h, **launch.dims, SPLITS_PAD=next_pow2(splits),
        )


def _forward_shared_bytes(config: dict, stacked: int, d_pad: int, problem: Problem) -> int:
    """Estimate: the Q tile plus num_stages buffered K and V tiles."""
    size = problem.dtype.itemsize
    return size * d_pad * (stacked * BLOCK_M + 2 * config["num_stages"] * config["BLOCK_N"])


MAX_HEAD_DIM = 256


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from . import triton_kernels  # imported on first use: importing triton is slow

    return triton_kernels


def _dot_precision(dtype):
    if dtype != torch.float32:
        return "ieee"  # unused for half inputs: the dot takes fp16/bf16 operands
    return "tf32" if os.environ.get("DMA_ALLOW_TF32") == "1" else "ieee"


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=MAX_HEAD_DIM,
        notes=("float32 dots are IEEE by default (DMA_ALLOW_TF32=1 for tf32)",),
    )
    block_m = BLOCK_M
    full_first = True  # the forward and dq skip the per-pair test on fully kept tiles

    def environment_reasons(self) -> list[str]:
        reasons = missing_packages("triton")
        if not interpreter_mode() and not torch.cuda.is_available():
            reasons.append("no CUDA device is available (set TRITON_INTERPRET=1 to run the "
                           "kernels on CPU through the Triton interpreter)")
        return reasons

    def problem_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device.type == "cpu" and not interpreter_mode():
            reasons.append("device cpu not supported (supports cuda; CPU only under "
                           "TRITON_INTERPRET=1)")
        if problem.device.type == "cpu" and problem.dtype == torch.bfloat16:
            reasons.append("dtype bfloat16 not supported by the Triton interpreter on CPU")
        if problem.device.type == "cuda":
            major, minor = device_capability(problem.device)
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} below 8.0")
        return reasons

    def forward(self, problem: Problem, inputs: Inputs, plan):
        # Decoding gathers a few thousand keys once: a float32 copy of key_bias (a kernel
        # and most of its bytes unread) would cost more than the prefetch it enables.
        launch = LaunchArgs(problem, inputs, plan,
                            float32_key_bias=problem.seqlen_q > DECODE_ROWS)
        b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
        out = new_output((b, sq, h, d), problem.dtype, problem.device)
        lse = new_output((b, h, sq), torch.float32, problem.device)

        def run(config):
            _launch_forward(problem, launch, plan, config, out, lse)

        name, config = forward_config(launch, problem)
        run_fitting(name, problem, tuned(name, problem, launch, config, run), run)
        return out, lse

    def row_delta(self, problem: Problem, o, do):
        b, sq, h, d = o.shape
        o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (o, do))
        delta = torch.empty(b, h, sq, dtype=torch.float32, device=o.device)
        block_rows = 16 if interpreter_mode() else 64
        run_kernel(_kernels()._row_delta_kernel, (cdiv(sq, block_rows), b * h),
                   o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0),
                   do.stride(1), do.stride(2), sq, h, HEAD_DIM=d,
                   D_PAD=LaunchArgs.padded_head_dim(d), BLOCK_ROWS=block_rows)
        return delta

    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        kern = _kernels()
        launch = LaunchArgs(problem, inputs, plan, float32_key_bias=True)
        bufs = backward_buffers(problem, launch, plan, lse, do, delta)
        b, h, sq = problem.batch, problem.heads, problem.seqlen_q
        need_kb, need_ab = problem.needs_grad[3], problem.needs_grad[4]
        d_pad = launch.dims["D_PAD"]
        common = dict(**launch.dims, DOT_PRECISION=_dot_precision(problem.dtype))
        dq, dk, dab = bufs.dq, bufs.dk, bufs.dab
        dab_arg = dab if need_ab else launch.q
        stats = (bufs.lse.stride(0), bufs.lse.stride(1))

        def run_dq(config, zero_first=False):
            if zero_first and bufs.dab_reduced:  # the kernel adds into d attn_bias
                dab.zero_()
            config = dict(config)
            stacked = launch.heads_per_program(config.pop("STACK"))
            tiles = launch.with_live_tiles(BLOCK_M, config["BLOCK_N"])
            run_kernel(kern._bwd_dq_kernel, (cdiv(sq, BLOCK_M), b * h // stacked),
                launch.q, launch.k, launch.v, bufs.do, bufs.lse, bufs.delta, dq, dab_arg,
                *launch.qkv, *stats,
                *bias_grad_strides(bufs, launch),
                *tiles.masks(), *tiles.candidates, tiles.full_count,
                *launch.sizes, h, problem.group_size, launch.scale, launch.softcap,
                **tiles.flags, NEED_DAB=need_ab, DAB_REDUCED=bufs.dab_reduced,
                DAB_ROWS=bufs.dab_reduced and dab.shape[2] > 1,
                DAB_KEYS=bufs.dab_reduced and dab.shape[3] > 1,
                HEADS_PER_PROG=stacked, BLOCK_M=BLOCK_M, WIDE_OFFSETS=launch.wide_offsets,
                **common, **config,
            )

        dq_config = tuned("dq", problem, launch, kernel_config("dq", d_pad), run_dq)
        # After tuning trials (which added into d attn_bias) the real launch zeroes it first.
        run_fitting("dq", problem, dq_config,
                    lambda config: run_dq(config, zero_first=triton_tuning.enabled()))

        dkb = bufs.dkb if need_kb else launch.q
        dkb_strides = (dkb.stride(0), dkb.stride(1)) if need_kb else (0, 0)
        dkdv = (launch.q, launch.k, launch.v, bufs.do, bufs.lse, bufs.delta, dk, bufs.dv, dkb,
                *launch.qkv, *stats, dk.stride(0), dk.stride(1), dk.stride(2), *dkb_strides)
        if bufs.atomics:
            shared = plan.heads < h or problem.group_size == 1
            heads_per_program = problem.group_size if shared else 1
            programs_per_batch = h // heads_per_program

            def run_dkdv(config, zero_first=False):
                if zero_first:  # the kernel adds into dk, dv and d key_bias
                    for t in (dk, bufs.dv, bufs.dkb):
                        if t is not None:
                            t.zero_()
                config = dict(config)
                rows = config.pop("ROWS")
                cand, count = coarse_candidate_lists(problem, plan, rows)
                n_blocks = cand.shape[2]
                key_split = candidate_key_split(problem, n_blocks * b * programs_per_batch)
                batched = plan.batch > 1
                grid = (n_blocks, b * programs_per_batch, key_split)
                run_kernel(kern._bwd_dkdv_candidates_kernel, grid,
                    *dkdv, *launch.key_bias, *launch.plan_rows,
                    *block_list_args(cand, count, batched),
                    *launch.sizes, programs_per_batch, heads_per_program, problem.group_size,
                    key_split, launch.scale, launch.softcap, ROWS_PER_PROGRAM=rows,
                    CAUSAL=launch.flags["CAUSAL"], HAS_KB=launch.flags["HAS_KB"],
                    SOFTCAP=launch.flags["SOFTCAP"],
                    NEED_DKB=need_kb, **common, **config,
                )

            config = tuned("dkdv_candidates", problem, launch,
                           kernel_config("dkdv_candidates", d_pad), run_dkdv)
            # After tuning trials (which added into dk, dv) the real launch zeroes them first.
            run_fitting("dkdv_candidates", problem, config,
                        lambda config: run_dkdv(config, zero_first=triton_tuning.enabled()))
        else:
            def run_dkdv(config):
                grid = (cdiv(problem.seqlen_k, config["BLOCK_N"]), b * problem.kv_heads)
                tiles = launch.with_live_tiles(config["BLOCK_M"], config["BLOCK_N"], by_key=True)
                run_kernel(kern._bwd_dkdv_keys_kernel, grid,
                    *dkdv, *tiles.masks(), *tiles.candidates, tiles.full_count, *launch.sizes,
                    problem.kv_heads, problem.group_size, launch.scale, launch.softcap,
                    **tiles.flags, NEED_DKB=need_kb, **common, **config,
                )

            config = tuned("dkdv_keys", problem, launch, kernel_config("dkdv_keys", d_pad),
                           run_dkdv)
            run_fitting("dkdv_keys", problem, config, run_dkdv)
        return finish_backward(problem, inputs, bufs)
