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

from ..layout import reduce_bias_grad
from ..selection import coarse_candidate_lists, rowwise_keep_all
from ..validation import Inputs, Problem
from .base import Backend, Capabilities, missing_packages, new_output

BLOCK_M = 64  # query rows per program; also the plan's block size

# Launch configuration per kernel: BLOCK_N (keys per tile), num_warps and num_stages; the
# forward and dq stack up to STACK heads of a kv group per program; the candidate dk/dv kernel
# walks ROWS rows per program (coarse blocks: fewer atomic adds, one per candidate key and
# block, at the cost of rows that keep few keys of a tile) in tiles of BLOCK_M rows.
# `benchmarks/tune_triton.py` times alternatives; OVERRIDES lets it (or a user) replace them.
CONFIGS = {
    # Tuned with benchmarks/tune_triton.py on an H100 (bf16, D=128, 16k tokens, window 2048).
    "fwd": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "STACK": 2},
    "dq": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "STACK": 2},
    "dkdv_candidates": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1,
                        "ROWS": 512},
    "dkdv_keys": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}
OVERRIDES: dict = {}


def kernel_config(kernel: str, d_pad: int) -> dict:
    """The launch configuration of one kernel for a padded head dim."""
    config = dict(CONFIGS[kernel])
    if d_pad > 128:  # 256-dim tiles: smaller key tiles, no stacking, shallow pipeline
        config.update(BLOCK_N=32, num_stages=1)
        if "STACK" in config:
            config["STACK"] = 1
    config.update(OVERRIDES.get(kernel, {}))
    if interpreter_mode():  # the interpreter is slow on big tiles and ignores the rest
        config.update(BLOCK_N=16, num_warps=1, num_stages=1)
        if "ROWS" in config:
            config["ROWS"] = 128
    return config
MAX_HEAD_DIM = 256


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def deterministic_mode() -> bool:
    return (torch.are_deterministic_algorithms_enabled()
            or os.environ.get("DMA_DETERMINISTIC") == "1")


def _kernels():
    from . import triton_kernels  # imported on first use: importing triton is slow

    return triton_kernels


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype):
    if dtype != torch.float32:
        return "ieee"  # unused for half inputs: the dot takes fp16/bf16 operands
    return "tf32" if os.environ.get("DMA_ALLOW_TF32") == "1" else "ieee"


class _Launch:
    """Pointer and stride arguments shared by every kernel, built once per call."""

    def __init__(self, problem: Problem, inputs: Inputs, plan, keep_mask=None):
        self.problem = problem
        q, k, v = (_last_dim_contiguous(t) for t in (inputs.q, inputs.k, inputs.v))
        self.q, self.k, self.v = q, k, v
        h = problem.heads
        dummy = q
        self.qkv = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2))

        kb = inputs.key_bias
        if kb is not None:
            kb = kb.contiguous()
            self.key_bias = (kb, kb.stride(0) if kb.shape[0] > 1 else 0, kb.stride(1),
                             h // kb.shape[1])
        else:  # absent inputs: a head divisor of H reads "shared by every head"
            self.key_bias = (dummy, 0, 0, h)
        self.attn_bias = self._bias4(inputs.attn_bias, h, dummy)
        mask = keep_mask if keep_mask is not None else inputs.attn_mask
        self.attn_mask = self._bias4(None if mask is None else mask.view(torch.uint8), h, dummy)
        pad = inputs.key_padding_mask
        if pad is not None and keep_mask is None:
            pad = pad.contiguous().view(torch.uint8)
            self.padding = (pad, pad.stride(0))
        else:
            self.padding = (dummy, 0)
        if plan is not None:
            first, end = plan.key_first_row, plan.key_end_row
            cand, count = plan.candidates, plan.candidate_count
            batched = plan.batch > 1
            self.plan_rows = (first, end, first.stride(0) if batched else 0, first.stride(1),
                              h // plan.heads)
            self.candidates = (cand, count, cand.stride(0) if batched else 0, cand.stride(1),
                               cand.stride(2), count.stride(0) if batched else 0, count.stride(1))
        else:
            self.plan_rows = (dummy, dummy, 0, 0, h)
            self.candidates = (dummy, dummy, 0, 0, 0, 0, 0)
        self.flags = dict(
            CAUSAL=problem.causal,
            HAS_KB=inputs.key_bias is not None,
            HAS_AB=inputs.attn_bias is not None,
            HAS_AM=mask is not None,
            HAS_PAD=self.padding[0] is not dummy,
            SOFTCAP=problem.softcap is not None,
            INTERVAL=plan is not None,
        )
        head_dim = problem.head_dim
        self.dims = dict(HEAD_DIM=head_dim, D_PAD=max(16, triton_next_pow2(head_dim)))
        self.sizes = (problem.seqlen_q, problem.seqlen_k, problem.causal_offset)
        self.scale = problem.scale
        self.softcap = problem.softcap if problem.softcap is not None else 1.0
        self.precision = _dot_precision(problem.dtype)

    @staticmethod
    def _bias4(t, heads, dummy):
        if t is None:
            return (dummy, 0, 0, 0, 0, heads)
        strides = [t.stride(i) if t.shape[i] > 1 else 0 for i in range(4)]
        return (t, *strides, heads // t.shape[1])

    def masks(self):
        """The (key_bias, attn_bias, attn_mask, padding, plan rows) argument run."""
        return (*self.key_bias, *self.attn_bias, *self.attn_mask, *self.padding,
                *self.plan_rows)

    def heads_per_program(self, stack: int) -> int:
        """Query heads stacked per program (at most `stack`): only when the kv group divides
        evenly and every per-head input (plan, key_bias, attn_bias, mask) is shared by it."""
        group = self.problem.group_size
        per_head = [self.plan_rows[4], self.key_bias[3], self.attn_bias[5], self.attn_mask[5]]
        if not all(hdiv % group == 0 for hdiv in per_head):
            return 1
        while stack > 1 and group % stack:
            stack //= 2
        return stack

    def config(self, kernel: str) -> dict:
        return kernel_config(kernel, self.dims["D_PAD"])


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=MAX_HEAD_DIM,
        notes=("float32 dots are IEEE by default (DMA_ALLOW_TF32=1 for tf32)",),
    )
    block_m = BLOCK_M

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
            major, minor = torch.cuda.get_device_capability(problem.device)
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} below 8.0")
        return reasons

    def forward(self, problem: Problem, inputs: Inputs, plan):
        kern = _kernels()
        launch = _Launch(problem, inputs, plan, rowwise_keep_all(problem, inputs))
        b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
        out = new_output((b, sq, h, d), problem.dtype, problem.device)
        lse = new_output((b, h, sq), torch.float32, problem.device)
        config = launch.config("fwd")
        stacked = launch.heads_per_program(config.pop("STACK"))
        grid = (triton_cdiv(sq, BLOCK_M), b * h // stacked)
        kern._fwd_kernel[grid](
            launch.q, launch.k, launch.v, out, lse, *launch.qkv,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            *launch.masks(), *launch.candidates,
            *launch.sizes, h, problem.group_size, launch.scale, launch.softcap,
            **launch.dims, BLOCK_M=BLOCK_M, **launch.flags, DOT_PRECISION=launch.precision,
            HEADS_PER_PROG=stacked, **config,
        )
        return out, lse


    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        kern = _kernels()
        launch = _Launch(problem, inputs, plan, rowwise_keep_all(problem, inputs))
        need_q, need_k, need_v, need_kb, need_ab = problem.needs_grad
        b, h, hkv = problem.batch, problem.heads, problem.kv_heads
        sq, sk, d = problem.seqlen_q, problem.seqlen_k, problem.head_dim
        # dq and do share q's strides, so the kernels take one set of query strides.
        do = _like_strides(launch.q, problem.dtype).copy_(do) if do.stride() != launch.q.stride() \
            else do
        lse = lse.contiguous()
        delta = delta.float().contiguous()
        device = problem.device
        common = dict(**launch.dims, DOT_PRECISION=launch.precision)

        dq = _like_strides(launch.q, problem.dtype)
        if os.environ.get("DMA_DEBUG_POISON") == "1":
            dq.fill_(float("nan"))
        dab_full = torch.zeros(b, h, sq, sk, dtype=torch.float32, device=device) \
            if need_ab else launch.q
        config = launch.config("dq")
        stacked = launch.heads_per_program(config.pop("STACK"))
        kern._bwd_dq_kernel[(triton_cdiv(sq, BLOCK_M), b * h // stacked)](
            launch.q, launch.k, launch.v, do, lse, delta, dq, dab_full, *launch.qkv,
            lse.stride(0), lse.stride(1),
            *((dab_full.stride(0), dab_full.stride(1), dab_full.stride(2)) if need_ab
              else (0, 0, 0)),
            *launch.masks(), *launch.candidates,
            *launch.sizes, h, problem.group_size, launch.scale, launch.softcap,
            **launch.flags, NEED_DAB=need_ab, HEADS_PER_PROG=stacked, BLOCK_M=BLOCK_M,
            **common, **config,
        )

        use_atomics = plan is not None and not deterministic_mode()
        acc_dtype = torch.float32 if use_atomics else problem.dtype
        alloc = torch.zeros if use_atomics else (lambda *s, **kw: new_output(s, **kw))
        dk = alloc(b, sk, hkv, d, dtype=acc_dtype, device=device)
        dv = alloc(b, sk, hkv, d, dtype=acc_dtype, device=device)
        dkb = alloc(b, h, sk, dtype=torch.float32, device=device) if need_kb else launch.q
        dkb_strides = (dkb.stride(0), dkb.stride(1)) if need_kb else (0, 0)
        if use_atomics:
            shared = plan.heads < h or problem.group_size == 1
            heads_per_program = problem.group_size if shared else 1
            programs_per_batch = h // heads_per_program
            config = launch.config("dkdv_candidates")
            rows = config.pop("ROWS")
            cand, count = coarse_candidate_lists(problem, plan, rows)
            n_blocks = cand.shape[2]
            programs = n_blocks * b * programs_per_batch
            key_split = max(1, min(8, -(-4 * _multiprocessors(device) // programs)))
            batched = plan.batch > 1
            kern._bwd_dkdv_candidates_kernel[(n_blocks, b * programs_per_batch, key_split)](
                launch.q, launch.k, launch.v, do, lse, delta, dk, dv, dkb, *launch.qkv,
                lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2),
                *dkb_strides, *launch.key_bias, *launch.plan_rows,
                cand, count, cand.stride(0) if batched else 0, cand.stride(1), cand.stride(2),
                count.stride(0) if batched else 0, count.stride(1),
                *launch.sizes, programs_per_batch, heads_per_program, problem.group_size,
                key_split, launch.scale, launch.softcap, ROWS_PER_PROGRAM=rows,
                HAS_KB=launch.flags["HAS_KB"], SOFTCAP=launch.flags["SOFTCAP"],
                NEED_DKB=need_kb, **common, **config,
            )
        else:
            config = launch.config("dkdv_keys")
            kern._bwd_dkdv_keys_kernel[(triton_cdiv(sk, config["BLOCK_N"]), b * hkv)](
                launch.q, launch.k, launch.v, do, lse, delta, dk, dv, dkb, *launch.qkv,
                lse.stride(0), lse.stride(1), dk.stride(0), dk.stride(1), dk.stride(2),
                *dkb_strides, *launch.masks(), *launch.sizes, hkv, problem.group_size,
                launch.scale, launch.softcap,
                **launch.flags, NEED_DKB=need_kb, **common, **config,
            )

        grad_kb = reduce_bias_grad(dkb, inputs.key_bias, hkv) if need_kb else None
        grad_ab = reduce_bias_grad(dab_full, inputs.attn_bias, hkv) if need_ab else None
        return (dq if need_q else None, dk.to(problem.dtype) if need_k else None,
                dv.to(problem.dtype) if need_v else None, grad_kb, grad_ab)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _multiprocessors(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _like_strides(t: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
