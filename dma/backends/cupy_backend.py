"""CuPy backend: hand-written CUDA C++ kernels (dma/backends/cuda/) compiled at run time.

An independent second implementation of the GPU path, mirroring the triton backend: the same
launch arguments (gpu_launch.py), the same tiles (candidate keys per query block in the DMA
case; under an explicit mask its live tiles, listed per block; dense tiles with per-element
masks otherwise) and the same backward order (dq over query blocks; dk/dv over candidate tiles
with float32 atomics by default, or over consecutive keys with one writer per element in
deterministic mode and the dense case).
"""

from __future__ import annotations

import math

import torch

from ..selection import coarse_candidate_lists
from ..validation import Inputs, Problem
from . import cupy_kernels
from .base import Backend, Capabilities, missing_packages, new_output
from .gpu_launch import (
    LaunchArgs,
    backward_buffers,
    bias_grad_strides,
    candidate_key_split,
    cdiv,
    device_capability,
    finish_backward,
    shared_memory_limit,
)

BLOCK_M = 128  # the plan's block size; kernels with smaller row tiles read the enclosing block
COARSE_ROWS = 512  # rows per program of the atomic dk/dv pass (as in the triton backend)


def _pointer(t) -> int:
    return 0 if t is None else t.data_ptr()


def _vector_loads(problem: Problem, tensors) -> bool:
    """Whether every (seq, dim) row of q, k, v (and dout) is 16-byte aligned and whole
    vectors, so the kernels may load 16 bytes per thread."""
    vec = 16 // problem.dtype.itemsize
    if problem.head_dim % vec:
        return False
    return all(t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in t.stride()[:-1])
               for t in tensors)


def _fields(problem: Problem, launch: LaunchArgs) -> dict:
    """The Params fields every kernel shares, with the backward's left empty."""
    kb, skb_b, skb_h, kb_hdiv = launch.key_bias
    ab, sab_b, sab_h, sab_r, sab_c, ab_hdiv = launch.attn_bias
    am, sam_b, sam_h, sam_r, sam_c, am_hdiv = launch.attn_mask
    pad, spad_b = launch.padding
    end, splan_b, splan_h, plan_hdiv = launch.plan_rows
    cand, count, scand_b, scand_h, scand_blk, scnt_b, scnt_h = launch.candidates
    flags = launch.flags
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h = launch.qkv
    return dict(
        q=_pointer(launch.q), k=_pointer(launch.k), v=_pointer(launch.v), out=0, lse=0,
        dout=0, delta=0, dq=0, dk=0, dv=0, dkb=0, dab=0,
        key_bias=_pointer(kb), attn_bias=_pointer(ab), attn_mask=_pointer(am),
        padding=_pointer(pad), end_row=_pointer(end),
        candidates=_pointer(cand), candidate_count=_pointer(count),
        full_count=_pointer(launch.full_count),
        sq_b=sq_b, sq_s=sq_s, sq_h=sq_h, sk_b=sk_b, sk_s=sk_s, sk_h=sk_h,
        sv_b=sv_b, sv_s=sv_s, sv_h=sv_h, so_b=0, so_s=0, so_h=0, slse_b=0, slse_h=0,
        sdk_b=0, sdk_s=0, sdk_h=0, sdkb_b=0, sdkb_h=0, sdab_b=0, sdab_h=0, sdab_r=0,
        sdab_c=0, dab_hdiv=1,
        skb_b=skb_b, skb_h=skb_h, kb_hdiv=kb_hdiv,
        sab_b=sab_b, sab_h=sab_h, sab_r=sab_r, sab_c=sab_c, ab_hdiv=ab_hdiv,
        sam_b=sam_b, sam_h=sam_h, sam_r=sam_r, sam_c=sam_c, am_hdiv=am_hdiv, spad_b=spad_b,
        splan_b=splan_b, splan_h=splan_h, plan_hdiv=plan_hdiv, scand_b=scand_b,
        scand_h=scand_h, scand_blk=scand_blk, scnt_b=scnt_b, scnt_h=scnt_h,
        plan_block=BLOCK_M, heads=problem.heads, kv_heads=problem.kv_heads,
        group=problem.group_size, seqlen_q=problem.seqlen_q, seqlen_k=problem.seqlen_k,
        causal_offset=problem.causal_offset, head_dim=problem.head_dim,
        coarse_rows=COARSE_ROWS, programs_per_batch=0, heads_per_program=0, key_split=1,
        causal=flags["CAUSAL"], has_kb=flags["HAS_KB"], has_ab=flags["HAS_AB"],
        has_am=flags["HAS_AM"], has_pad=flags["HAS_PAD"], has_softcap=flags["SOFTCAP"],
        interval=flags["INTERVAL"], tile_list=flags["TILE_LIST"], need_dab=0, need_dkb=0,
        candidate_tiles=0,
        vector_loads=_vector_loads(problem, (launch.q, launch.k, launch.v)),
        scale=launch.scale, softcap=launch.softcap,
    )


def _kernel_for(kernel: str, problem: Problem, launch: LaunchArgs, tensors) -> str:
    """`kernel`, or its warpgroup version where that serves (cupy_kernels.hopper_kernel);
    `tensors` are the ones it loads 16 bytes at a time."""
    return cupy_kernels.hopper_kernel(kernel, problem.dtype, launch.dims["D_PAD"],
                                      device_capability(problem.device),
                                      _vector_loads(problem, tensors))


def _kernel_fields(kernel: str, problem: Problem, launch: LaunchArgs, by_key: bool = False):
    """(arguments, fields) for one kernel: `launch` with an explicit mask's live tiles
    listed for that kernel's own tiles (forward and dq: per block of rows; dk/dv, `by_key`:
    per tile of keys), and its `_fields`. The fields hold bare pointers, so the arguments
    (which own the lists) must reach the launch."""
    block_m, block_n = cupy_kernels.tiles(kernel, problem.dtype, launch.dims["D_PAD"])
    listed = launch.with_live_tiles(block_m, block_n, by_key)
    fields = _fields(problem, listed)
    if listed.flags["TILE_LIST"]:
        fields["plan_block"] = block_m  # the lists' blocks are the kernel's own
    return listed, fields


class CupyBackend(Backend):
    name = "cupy"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        notes=("float32 runs scalar FMAs (IEEE), half types run mma.sync tensor cores",),
    )
    block_m = BLOCK_M
    full_first = True  # the forward and dq skip the per-pair test on fully kept tiles

    def environment_reasons(self) -> list[str]:
        reasons = missing_packages("cupy")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return reasons

    def problem_reasons(self, problem: Problem) -> list[str]:
        if problem.device.type != "cuda":
            return []
        reasons = []
        major, minor = device_capability(problem.device)
        if major < 8:
            reasons.append(f"compute capability {major}.{minor} below 8.0")
        d_pad = LaunchArgs.padded_head_dim(problem.head_dim)
        if problem.dtype in cupy_kernels.ELEMENT_TYPES and d_pad in cupy_kernels.HEAD_DIM_PADS:
            need = max(cupy_kernels.shared_bytes(k, problem.dtype, d_pad)
                       for k in cupy_kernels.KERNELS)
            have = shared_memory_limit(problem.device)
            if have is not None and need > have:
                reasons.append(f"needs {need} bytes of shared memory per block, the device "
                               f"offers {have}")
        return reasons

    def forward(self, problem: Problem, inputs: Inputs, plan):
        launch = LaunchArgs(problem, inputs, plan)
        b, h, sq, d = problem.batch, problem.heads, problem.seqlen_q, problem.head_dim
        out = new_output((b, sq, h, d), problem.dtype, problem.device)
        lse = new_output((b, h, sq), torch.float32, problem.device)
        kernel = _kernel_for("dma_forward", problem, launch, (launch.q, launch.k, launch.v))
        launch, fields = _kernel_fields(kernel, problem, launch)
        fields.update(out=out.data_ptr(), lse=lse.data_ptr(), so_b=out.stride(0),
                      so_s=out.stride(1), so_h=out.stride(2), slse_b=lse.stride(0),
                      slse_h=lse.stride(1))
        self._launch(kernel, problem, launch,
                     (self._query_blocks(kernel, problem, launch), b * h), fields)
        return out, lse

    def row_delta(self, problem: Problem, o, do):
        """rowsum(do * o) in float32 by one kernel, dma_row_delta (reads o and do once;
        the base class's torch version makes float32 copies of both)."""
        b, sq, h, _ = o.shape
        delta = new_output((b, h, sq), torch.float32, problem.device)
        if delta.numel() == 0:
            return delta
        o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (o, do))
        fields = dict.fromkeys((name for name, _ in cupy_kernels.params_fields()), 0)
        fields.update(out=o.data_ptr(), so_b=o.stride(0), so_s=o.stride(1), so_h=o.stride(2),
                      dout=do.data_ptr(), sq_b=do.stride(0), sq_s=do.stride(1),
                      sq_h=do.stride(2), delta=delta.data_ptr(), slse_b=delta.stride(0),
                      slse_h=delta.stride(1), heads=h, seqlen_q=sq, head_dim=problem.head_dim)
        cupy_kernels.launch(cupy_kernels.ROW_DELTA, problem.dtype, 0,
                            (cdiv(sq, cupy_kernels.ROW_DELTA_WARPS), b * h), problem.device,
                            fields)
        return delta

    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        launch = LaunchArgs(problem, inputs, plan)
        bufs = backward_buffers(problem, launch, plan, lse, do, delta)
        b, h = problem.batch, problem.heads
        need_kb, need_ab = problem.needs_grad[3], problem.needs_grad[4]
        loaded = (launch.q, launch.k, launch.v, bufs.do)
        dq_kernel = _kernel_for("dma_backward_dq", problem, launch, loaded)
        dkdv_kernel = _kernel_for("dma_backward_dkdv", problem, launch, loaded)
        # An explicit mask's tiles are counted once, at the tiles both kernels' tiles are
        # multiples of; each kernel's lists sum those counts.
        d_pad = launch.dims["D_PAD"]
        dq_tiles = cupy_kernels.tiles(dq_kernel, problem.dtype, d_pad)
        dkdv_tiles = cupy_kernels.tiles(dkdv_kernel, problem.dtype, d_pad)
        launch.count_mask_tiles(*map(math.gcd, dq_tiles, dkdv_tiles))
        dkdv_launch, dkdv_fields = _kernel_fields(dkdv_kernel, problem, launch, by_key=True)
        dq_launch, dq_fields = _kernel_fields(dq_kernel, problem, launch)
        gradients = dict(
            dout=bufs.do.data_ptr(), lse=bufs.lse.data_ptr(), delta=bufs.delta.data_ptr(),
            slse_b=bufs.lse.stride(0), slse_h=bufs.lse.stride(1),
            dq=bufs.dq.data_ptr(), dk=bufs.dk.data_ptr(), dv=bufs.dv.data_ptr(),
            sdk_b=bufs.dk.stride(0), sdk_s=bufs.dk.stride(1), sdk_h=bufs.dk.stride(2),
            dkb=_pointer(bufs.dkb), need_dkb=need_kb, dab=_pointer(bufs.dab), need_dab=need_ab,
            vector_loads=dq_fields["vector_loads"] and _vector_loads(problem, (bufs.do,)),
        )
        if need_kb:
            gradients.update(sdkb_b=bufs.dkb.stride(0), sdkb_h=bufs.dkb.stride(1))
        if need_ab:
            sdab_b, sdab_h, sdab_r, sdab_c, dab_hdiv = bias_grad_strides(bufs, launch)
            gradients.update(sdab_b=sdab_b, sdab_h=sdab_h, sdab_r=sdab_r, sdab_c=sdab_c,
                             dab_hdiv=dab_hdiv)
        dq_fields.update(gradients)
        dkdv_fields.update(gradients)
        self._launch(dq_kernel, problem, dq_launch,
                     (self._query_blocks(dq_kernel, problem, launch), b * h), dq_fields)

        if bufs.atomics:
            shared = plan.heads < h or problem.group_size == 1
            heads_per_program = problem.group_size if shared else 1
            programs_per_batch = h // heads_per_program
            cand, count = coarse_candidate_lists(problem, plan, COARSE_ROWS)
            n_blocks = cand.shape[2]
            key_split = candidate_key_split(problem, n_blocks * b * programs_per_batch)
            batched = plan.batch > 1
            dkdv_fields.update(
                candidate_tiles=1, candidates=cand.data_ptr(), candidate_count=count.data_ptr(),
                scand_b=cand.stride(0) if batched else 0, scand_h=cand.stride(1),
                scand_blk=cand.stride(2), scnt_b=count.stride(0) if batched else 0,
                scnt_h=count.stride(1), programs_per_batch=programs_per_batch,
                heads_per_program=heads_per_program, key_split=key_split)
            grid = (n_blocks, b * programs_per_batch, key_split)
        else:
            grid = (cdiv(problem.seqlen_k, dkdv_tiles[1]), b * problem.kv_heads)
        self._launch(dkdv_kernel, problem, dkdv_launch, grid, dkdv_fields)
        return finish_backward(problem, inputs, bufs)

    @staticmethod
    def _query_blocks(kernel: str, problem: Problem, launch: LaunchArgs) -> int:
        """Programs along the query rows: the kernel's own rows per block (the forward's
        16-bit blocks hold 128 rows, dq's 64)."""
        rows, _ = cupy_kernels.tiles(kernel, problem.dtype, launch.dims["D_PAD"])
        return cdiv(problem.seqlen_q, rows)

    @staticmethod
    def _launch(kernel, problem, launch, grid, fields):
        """Launch `kernel` with `fields`, whose pointers `launch` (the arguments they were
        read from) keeps alive until the launch is queued."""
        cupy_kernels.launch(kernel, problem.dtype, launch.dims["D_PAD"], grid, problem.device,
                            fields)
