"""Host-side launch arguments shared by the GPU backends (triton and cupy).

Both walk the same tiles with the same inputs, so one place turns validated inputs and a
selection plan into pointers, strides and flags, and one place allocates the backward's
buffers and reduces them to the inputs' shapes.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import reduce_bias_grad
from ..selection import rowwise_keep_all
from ..tile_lists import TileCounter, cdiv, live_tile_lists
from ..triton_launch import next_pow2
from ..validation import Inputs, Problem
from .base import deterministic_mode, new_output

INT32_OFFSETS = 2**31  # offsets within a tensor at or past this need 64-bit arithmetic


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device):
    """torch's properties of a CUDA device, asked once per device: the dispatcher and the
    launches ask on every call, and torch's lookup takes microseconds of host time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _properties(index)


def device_capability(device) -> tuple[int, int]:
    """(major, minor) of a CUDA device."""
    props = device_properties(device)
    return props.major, props.minor


def multiprocessors(device) -> int:
    if device.type != "cuda":
        return 1
    return device_properties(device).multi_processor_count


def shared_memory_limit(device) -> Optional[int]:
    """Shared memory a program may opt in to on this device, in bytes (None: not reported)."""
    return getattr(device_properties(device), "shared_memory_per_block_optin", None)


def like_strides(t: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class LaunchArgs:
    """Pointer and stride arguments shared by every kernel, built once per call. Each input
    is a tuple (tensor, strides..., head divisor); absent inputs point at q with zero strides
    and a head divisor of H ("shared by every head")."""

    def __init__(self, problem: Problem, inputs: Inputs, plan, float32_key_bias: bool = False):
        """`float32_key_bias`: pass key_bias as float32 when keys are gathered (the DMA case;
        the kernels compute in float32 anyway): a 4-byte element lets Triton's pipeliner
        prefetch the gathered loads asynchronously, where 2-byte ones are loaded synchronously
        inside the key loop. Consecutive keys load as wide vectors either way."""
        self.problem = problem
        keep_mask = rowwise_keep_all(problem, inputs)
        q, k, v = (_last_dim_contiguous(t) for t in (inputs.q, inputs.k, inputs.v))
        self.q, self.k, self.v = q, k, v
        h = problem.heads
        dummy = q
        self.qkv = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2))

        kb = inputs.key_bias
        if kb is not None:
            kb = kb.to(torch.float32) if float32_key_bias and plan is not None else kb
            kb = kb.contiguous()
            self.key_bias = (kb, kb.stride(0) if kb.shape[0] > 1 else 0, kb.stride(1),
                             h // kb.shape[1])
        else:
            self.key_bias = (dummy, 0, 0, h)
        self.attn_bias = self._bias4(inputs.attn_bias, h, dummy)
        mask = keep_mask if keep_mask is not None else inputs.attn_mask
        self.attn_mask = self._bias4(None if mask is None else mask.view(torch.uint8), h, dummy)
        # The mask's allowed pairs per tile, counted on first use (with_live_tiles): kernels
        # launched with these arguments share that one pass over the mask.
        self._mask_tiles = TileCounter(mask) if mask is not None else None
        pad = inputs.key_padding_mask
        if pad is not None and keep_mask is None:
            pad = pad.contiguous().view(torch.uint8)
            self.padding = (pad, pad.stride(0))
        else:
            self.padding = (dummy, 0)
        if plan is not None:
            end, cand, count = plan.key_end_row, plan.candidates, plan.candidate_count
            batched = plan.batch > 1
            # The kernels read each key's end row only: a kept key's first row is its causal
            # start (triton_kernels._key_rows, cuda/dma_common.cuh key_facts).
            self.plan_rows = (end, end.stride(0) if batched else 0, end.stride(1),
                              h // plan.heads)
            self.candidates = block_list_args(cand, count, batched)
            self.full_count = plan.full_count  # read with candidate_count's strides
        else:
            self.plan_rows = (dummy, 0, 0, h)
            self.candidates = (dummy, dummy, 0, 0, 0, 0, 0)
            self.full_count = dummy
        self.flags = dict(
            CAUSAL=problem.causal,
            HAS_KB=inputs.key_bias is not None,
            HAS_AB=inputs.attn_bias is not None,
            HAS_AM=mask is not None,
            HAS_PAD=self.padding[0] is not dummy,
            SOFTCAP=problem.softcap is not None,
            INTERVAL=plan is not None,
            TILE_LIST=False,  # see with_live_tiles
        )
        head_dim = problem.head_dim
        self.dims = dict(HEAD_DIM=head_dim, D_PAD=self.padded_head_dim(head_dim))
        self.sizes = (problem.seqlen_q, problem.seqlen_k, problem.causal_offset)
        # Whether a gathered K/V row's offset (key x row stride) may pass int32 (see
        # triton_kernels._gathered_rows).
        self.wide_offsets = problem.seqlen_k * max(k.stride(1), v.stride(1)) >= INT32_OFFSETS
        self.scale = problem.scale
        self.softcap = problem.softcap if problem.softcap is not None else 1.0

    @staticmethod
    def padded_head_dim(head_dim: int) -> int:
        """Head dim of the kernels' tiles: a power of two, at least 16."""
        return max(16, next_pow2(head_dim))

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

    def count_mask_tiles(self, block_m: int, block_n: int) -> None:
        """Count an explicit mask's tiles of this size now, so that every multiple of it
        that `with_live_tiles` asks for later sums these counts (one pass over the mask for
        kernels whose tiles differ: ask for the finest common tile first)."""
        if self.flags["HAS_AM"] and not self.flags["INTERVAL"]:
            self._mask_tiles.counts(block_m, block_n)

    def with_live_tiles(self, block_m: int, block_n: int, by_key: bool = False) -> LaunchArgs:
        """These arguments, with the candidate slots listing per block of `block_m` rows (by
        key: per tile of `block_n` keys) the tiles that the explicit mask and causality leave
        live, so that dense tiles that are all masked are never visited, and the full count
        saying how many of them (listed first) those allow whole, so that they skip the
        per-pair test. Unchanged without an explicit mask, and in the DMA case (whose
        candidates already bound the work)."""
        if not self.flags["HAS_AM"] or self.flags["INTERVAL"]:
            return self
        hdiv = self.attn_mask[5]
        lists = live_tile_lists(self.problem, self._mask_tiles.counts(block_m, block_n), by_key)
        listed = copy.copy(self)
        listed.candidates = block_list_args(lists.tiles, lists.counts,
                                            batched=lists.tiles.shape[0] > 1)
        listed.full_count = lists.full_counts  # read with the counts' strides
        listed.plan_rows = (*self.plan_rows[:3], hdiv)  # the lists are per mask head
        listed.flags = dict(self.flags, TILE_LIST=True)
        return listed

    def heads_per_program(self, stack: int) -> int:
        """Query heads stacked per program (at most `stack`): only when the kv group divides
        evenly and every per-head input (plan, key_bias, attn_bias, mask) is shared by it."""
        group = self.problem.group_size
        per_head = [self.plan_rows[3], self.key_bias[3], self.attn_bias[5], self.attn_mask[5]]
        if not all(hdiv % group == 0 for hdiv in per_head):
            return 1
        while stack > 1 and group % stack:
            stack //= 2
        return stack


def block_list_args(lists: torch.Tensor, counts: torch.Tensor, batched: bool) -> tuple:
    """A per-block list (candidate keys, or live tiles) as the kernels take it: lists
    (batch, heads, blocks, slots) and counts (batch, heads, blocks) with their strides, the
    batch stride 0 when one list serves the whole batch."""
    return (lists, counts, lists.stride(0) if batched else 0, lists.stride(1), lists.stride(2),
            counts.stride(0) if batched else 0, counts.stride(1))


@dataclass
class BackwardBuffers:
    """What the backward kernels write. dk/dv (and d key_bias) are float32 and zeroed when
    added to with atomics (the DMA case's candidate tiles), else written once each."""

    do: torch.Tensor  # the output gradient, in q's strides (dq and do share them)
    lse: torch.Tensor
    delta: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dkb: Optional[torch.Tensor]  # (B, H, Sk) float32, per query head
    # d attn_bias in float32: (B, H, Sq, Sk), reduced to attn_bias's shape after, or already
    # in that shape (dab_reduced) when the kernel adds into it atomically
    dab: Optional[torch.Tensor]
    atomics: bool
    dab_reduced: bool = False


def backward_buffers(problem: Problem, launch: LaunchArgs, plan, lse, do, delta):
    """The backward's buffers. d attn_bias has attn_bias's own shape (the kernels add into
    it atomically), except in deterministic mode: (B, H, Sq, Sk), one writer per element,
    reduced after."""
    need_kb, need_ab = problem.needs_grad[3], problem.needs_grad[4]
    b, h, hkv = problem.batch, problem.heads, problem.kv_heads
    sq, sk, d = problem.seqlen_q, problem.seqlen_k, problem.head_dim
    device = problem.device
    if do.stride() != launch.q.stride():
        do = like_strides(launch.q, problem.dtype).copy_(do)
    dq = like_strides(launch.q, problem.dtype)
    if os.environ.get("DMA_DEBUG_POISON") == "1":
        dq.fill_(float("nan"))
    atomics = plan is not None and not deterministic_mode()
    if atomics:
        def alloc(*shape, dtype):
            return torch.zeros(shape, dtype=torch.float32, device=device)
    else:
        def alloc(*shape, dtype):
            return new_output(shape, dtype, device)
    dab_reduced = need_ab and not deterministic_mode()
    dab_shape = launch.attn_bias[0].shape if dab_reduced else (b, h, sq, sk)
    return BackwardBuffers(
        do=do, lse=lse.contiguous(), delta=delta.float().contiguous(), dq=dq,
        dk=alloc(b, sk, hkv, d, dtype=problem.dtype), dv=alloc(b, sk, hkv, d, dtype=problem.dtype),
        dkb=alloc(b, h, sk, dtype=torch.float32) if need_kb else None,
        dab=torch.zeros(dab_shape, dtype=torch.float32, device=device) if need_ab else None,
        atomics=atomics, dab_reduced=dab_reduced)


def bias_grad_strides(bufs: BackwardBuffers, launch: LaunchArgs) -> tuple:
    """d attn_bias strides (batch, head, row, key) and head divisor, as the kernels that
    write it take them (triton's `_write_bias_grad`, cupy's `dq_scores`): the full
    (B, H, Sq, Sk) buffer, or attn_bias's own shape with broadcast dims at 0."""
    dab = bufs.dab
    if dab is None:
        return (0, 0, 0, 0, 1)
    if not bufs.dab_reduced:
        return (dab.stride(0), dab.stride(1), dab.stride(2), 1, 1)
    strides = [dab.stride(i) if dab.shape[i] > 1 else 0 for i in range(4)]
    return (*strides, launch.attn_bias[5])


def finish_backward(problem: Problem, inputs: Inputs, bufs: BackwardBuffers):
    """(dq, dk, dv, d key_bias, d attn_bias) in the inputs' dtypes and shapes."""
    need_q, need_k, need_v, need_kb, need_ab = problem.needs_grad
    hkv = problem.kv_heads
    grad_kb = reduce_bias_grad(bufs.dkb, inputs.key_bias, hkv) if need_kb else None
    grad_ab = None
    if need_ab:
        grad_ab = (bufs.dab.to(inputs.attn_bias.dtype) if bufs.dab_reduced
                   else reduce_bias_grad(bufs.dab, inputs.attn_bias, hkv))
    return (bufs.dq if need_q else None, bufs.dk.to(problem.dtype) if need_k else None,
            bufs.dv.to(problem.dtype) if need_v else None, grad_kb, grad_ab)


def candidate_key_split(problem: Problem, programs: int) -> int:
    """How many programs share one coarse block's candidate tiles in the atomic dk/dv pass:
    enough programs for about four per multiprocessor, at most 8."""
    return max(1, min(8, cdiv(4 * multiprocessors(problem.device), programs)))
