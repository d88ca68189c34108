"""Numba backend: the CPU path (kernels in numba_kernels.py, imported on first use).

float32 and float64 are computed natively; float16 and bfloat16 inputs are computed in float32
and returned in their own dtype. Threads: numba's pool (NUMBA_NUM_THREADS, or
`numba.set_num_threads`) runs the tasks; the tile products inside a task call BLAS (torch's
MKL where exported, else scipy's; numba_blas.py), one thread per call, so the two never
oversubscribe the cores. The first call of each kernel signature compiles it (tens of
seconds); compiled code is cached on disk (`cache=True`) for later processes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..layout import reduce_bias_grad
from ..selection import rowwise_keep_all
from ..tile_lists import TileCounter, live_tile_lists
from ..validation import SUPPORTED_DTYPES, Inputs, Problem
from .base import Backend, Capabilities, deterministic_mode, missing_packages, new_output

BLOCK_M = 64  # query rows per parallel task; also the plan's block size


def _kernels():
    from . import numba_kernels

    return numba_kernels


def _blas():
    from . import numba_blas

    return numba_blas


def _compute_dtype(problem: Problem):
    return torch.float64 if problem.dtype == torch.float64 else torch.float32


def _heads_first(t: torch.Tensor, dtype) -> np.ndarray:
    """(B, S, H, D) -> contiguous (B, H, S, D) numpy array in the compute dtype."""
    return t.detach().transpose(1, 2).to(dtype).contiguous().numpy()


def _broadcast_args(t, heads, np_dtype):
    """A bias or mask at its own shape plus (batch, head divisor, row, key, present) ints:
    index [b * m0, h // m1, i * m2, j * m3]; dims of size 1 get multiplier 0."""
    if t is None:
        return np.zeros((1, 1, 1, 1), np_dtype), np.array([0, heads, 0, 0, 0], np.int64)
    torch_dtype = {np.bool_: torch.bool, np.float64: torch.float64}.get(np_dtype, torch.float32)
    mults = [int(t.shape[0] > 1), heads // t.shape[1], int(t.shape[2] > 1), int(t.shape[3] > 1),
             1]
    return t.detach().to(torch_dtype).contiguous().numpy(), np.array(mults, np.int64)


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def _thread_ids() -> int:
    """How many thread ids the kernels may see (numba's pool size, which bounds
    `numba.get_thread_id()` whatever `numba.set_num_threads` says)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def _key_chunk(problem: Problem) -> int:
    """Keys per dk/dv task: up to 1024 (fewer, larger tile products), but small enough to
    leave about four tasks per thread."""
    keys = problem.batch * problem.kv_heads * problem.seqlen_k
    chunk = 1024
    while chunk > 64 and keys < 4 * _threads() * chunk:
        chunk //= 2
    return chunk


# Most memory the one-pass backward may spend on per-thread dq partial sums.
ONE_PASS_DQ_BYTES = 1 << 30


def _one_pass_backward(q: np.ndarray) -> bool:
    """One pass for dq, dk and dv (each tile's scores and probabilities computed once, dq
    summed from per-thread partials) unless deterministic mode is on or the partials would
    take more than ONE_PASS_DQ_BYTES; otherwise a dq pass over query blocks first."""
    return not deterministic_mode() and _thread_ids() * q.nbytes <= ONE_PASS_DQ_BYTES


class _Arrays:
    """Numpy views and index multipliers for one call, shared by forward and backward."""

    def __init__(self, problem: Problem, inputs: Inputs, plan, keep_mask):
        dtype = _compute_dtype(problem)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        h = problem.heads
        self.q = _heads_first(inputs.q, dtype)
        self.k = _heads_first(inputs.k, dtype)
        self.v = _heads_first(inputs.v, dtype)
        kb = inputs.key_bias
        if kb is None:
            self.kb, self.kb_m = np.zeros((1, 1, 1), np_dtype), np.array([0, h, 0], np.int64)
        else:
            self.kb = kb.detach().to(dtype).contiguous().numpy()
            self.kb_m = np.array([int(kb.shape[0] > 1), h // kb.shape[1], 1], np.int64)
        self.ab, self.ab_m = _broadcast_args(inputs.attn_bias, h, np_dtype)
        mask = keep_mask if keep_mask is not None else inputs.attn_mask
        self.am, self.am_m = _broadcast_args(mask, h, np.bool_)
        pad = inputs.key_padding_mask if keep_mask is None else None
        self.has_pad = pad is not None
        self.pad = pad.contiguous().numpy() if pad is not None else np.zeros((1, 1), np.bool_)
        self.interval = plan is not None
        if plan is not None:
            self.first = plan.key_first_row.contiguous().numpy()
            self.end = plan.key_end_row.contiguous().numpy()
            self.cand = plan.candidates.contiguous().numpy()
            self.count = plan.candidate_count.contiguous().numpy()
            self.plan_m = np.array([int(plan.batch > 1), h // plan.heads], np.int64)
        else:
            zeros3 = np.zeros((1, 1, 1), np.int32)
            self.first = self.end = self.count = zeros3
            self.cand = np.zeros((1, 1, 1, 1), np.int32)
            self.plan_m = np.array([0, h], np.int64)
        self.masks = (self.kb, self.kb_m, self.ab, self.ab_m, self.am, self.am_m, self.pad,
                      self.has_pad)
        # An explicit mask outside the DMA case: the kernels walk its live tiles only.
        self.problem = problem
        self.mask_tiles = TileCounter(mask) if mask is not None and plan is None else None
        self.scalars = (problem.causal, problem.causal_offset, problem.scale,
                        problem.softcap if problem.softcap is not None else 0.0)


    def walk(self, block_n: int, by_key: bool = False) -> tuple:
        """What a kernel walks, as its (cand, count, full, plan_m, interval, tile_list)
        arguments: the plan's candidates, an explicit mask's live tiles of BLOCK_M rows by
        `block_n` keys (per block of rows, or `by_key` per tile of keys; `full` says how many
        of them, listed first, the mask allows whole), or neither (consecutive keys)."""
        if self.mask_tiles is None:
            return self.cand, self.count, self.count, self.plan_m, self.interval, False
        lists = live_tile_lists(self.problem, self.mask_tiles.counts(BLOCK_M, block_n), by_key)
        batched, mask_heads = lists.tiles.shape[0] > 1, lists.tiles.shape[1]
        list_m = np.array([int(batched), self.problem.heads // mask_heads], np.int64)
        return (lists.tiles.numpy(), lists.counts.numpy(), lists.full_counts.numpy(), list_m,
                False, True)


class NumbaBackend(Backend):
    name = "numba"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset(SUPPORTED_DTYPES),
        notes=("float16/bfloat16 computed in float32; dk, dv, d key_bias deterministic, dq too "
               "in deterministic mode",),
    )
    block_m = BLOCK_M

    def environment_reasons(self) -> list[str]:
        return missing_packages("numba")


    def _forward_arrays(self, problem, arrays):
        b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
        out = np.empty((b, h, sq, d), arrays.q.dtype)
        lse = np.empty((b, h, sq), arrays.q.dtype)
        a = arrays
        blas = _blas()
        with blas.single_threaded_blas():
            _kernels().forward_kernel(
                blas.gemm_function(a.q.dtype), a.q, a.k, a.v, out, lse, *a.masks, a.first, a.end,
                *a.walk(_kernels().BLOCK_N), *a.scalars, BLOCK_M)
        return out, lse

    def forward(self, problem: Problem, inputs: Inputs, plan):
        arrays = _Arrays(problem, inputs, plan, rowwise_keep_all(problem, inputs))
        out_np, lse_np = self._forward_arrays(problem, arrays)
        out = new_output(inputs.q.shape, problem.dtype, problem.device)
        out.copy_(torch.from_numpy(out_np).transpose(1, 2))
        return out, torch.from_numpy(lse_np).float()

    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        kern = _kernels()
        arrays = _Arrays(problem, inputs, plan, rowwise_keep_all(problem, inputs))
        a = arrays
        need_q, need_k, need_v, need_kb, need_ab = problem.needs_grad
        b, h, hkv = problem.batch, problem.heads, problem.kv_heads
        sq, sk = problem.seqlen_q, problem.seqlen_k
        dtype = a.q.dtype
        key_chunk = _key_chunk(problem)
        if a.mask_tiles is not None:  # the finest tiles first: every kernel's tiles sum them
            a.mask_tiles.counts(BLOCK_M, math.gcd(kern.BLOCK_N, key_chunk))
        if dtype == np.float64:  # the float32 lse would cost float64 gradients precision
            _, lse_np = self._forward_arrays(problem, arrays)
        else:
            lse_np = lse.contiguous().numpy()
        do_np = _heads_first(do, _compute_dtype(problem))
        delta_np = delta.to(_compute_dtype(problem)).contiguous().numpy()
        dab = np.zeros((b, h, sq, sk) if need_ab else (1, 1, 1, 1), dtype)
        dk, dv = np.empty_like(a.k), np.empty_like(a.v)
        dkb = np.empty((b, h, sk), dtype)
        one_pass = _one_pass_backward(a.q)
        dq_parts = np.zeros((_thread_ids(),) + a.q.shape if one_pass else (1,) * 5, dtype)
        blas = _blas()
        gemm = blas.gemm_function(dtype)
        with blas.single_threaded_blas():
            if not one_pass:
                dq = np.empty_like(a.q)
                kern.dq_kernel(gemm, a.q, a.k, a.v, do_np, lse_np, delta_np, dq, dab, need_ab,
                               *a.masks, a.first, a.end, *a.walk(kern.BLOCK_N), *a.scalars,
                               BLOCK_M)
            kern.dkdv_kernel(gemm, a.q, a.k, a.v, do_np, lse_np, delta_np, dk, dv, dkb, dq_parts,
                             one_pass, dab, need_ab, *a.masks, a.first, a.end,
                             *a.walk(key_chunk, by_key=True), *a.scalars, BLOCK_M, key_chunk)
        if one_pass:
            dq = dq_parts.sum(axis=0)
            dq *= problem.scale

        def back(array, like):
            return torch.from_numpy(array).transpose(1, 2).to(like.dtype)

        grad_kb = reduce_bias_grad(torch.from_numpy(dkb), inputs.key_bias, hkv) \
            if need_kb else None
        grad_ab = reduce_bias_grad(torch.from_numpy(dab), inputs.attn_bias, hkv) \
            if need_ab else None
        return (back(dq, inputs.q) if need_q else None, back(dk, inputs.k) if need_k else None,
                back(dv, inputs.v) if need_v else None, grad_kb, grad_ab)
