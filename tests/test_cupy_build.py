"""The cupy backend without a GPU: its CUDA sources compile with nvcc for sm_80 and sm_90,
and the launcher's host side (Params layout, argument packing, tile sizes) is consistent."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dma.backends import cupy_backend, cupy_kernels
from dma.backends.gpu_launch import LaunchArgs
from dma.benchmarking import document_ids, document_mask
from dma.validation import validate
from harness import benchmark_script

NVCC = shutil.which("nvcc")


def _instantiations(kernels):
    lines = [f'#include "{cupy_kernels.KERNEL_HEADER}"',
             f"static_assert(sizeof(Params) == {8 * len(cupy_kernels.params_fields())}, "
             '"Params layout differs from the one the launcher reads");']
    for kernel, dtype, d_pad in kernels:
        for softcap in cupy_kernels.softcap_flags(kernel):
            name = cupy_kernels.instantiation(kernel, dtype, d_pad, softcap)
            lines.append(f"template __global__ void {name}(const Params);")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    # Every kernel and element type, at the smallest head dim and at 256 (the 32-row tiles);
    # the head dims between differ only in a template constant. The warpgroup forward (every
    # instantiation) compiles for sm_90a, the only target it runs on.
    common = [k for k in cupy_kernels.all_instantiations() if k[2] in (16, 256)]
    common += cupy_kernels.row_delta_instantiations()
    targets = {"80": common, "90": common, "90a": cupy_kernels.wgmma_instantiations()}
    builds = {}
    for arch, kernels in targets.items():  # all at once: ptxas is the slow part
        source = tmp_path / f"instantiations_{arch}.cu"
        source.write_text(_instantiations(kernels))
        cubin = tmp_path / f"sm{arch}.cubin"
        cmd = [NVCC, "-std=c++17", "-cubin", f"-arch=sm_{arch}",
               f"-I{cupy_kernels.source_dir()}", "-o", str(cubin), str(source)]
        builds[cubin] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    for cubin, build in builds.items():
        _, err = build.communicate()
        assert build.returncode == 0, err[-4000:]
        assert cubin.stat().st_size > 0


def test_params_layout_matches_header():
    fields = cupy_kernels.params_fields()
    names = [name for name, _ in fields]
    assert len(names) == len(set(names))
    for name in ("q", "candidates", "seqlen_q", "scale", "softcap", "vector_loads"):
        assert name in names
    assert dict(fields)["scale"] == "float64" and dict(fields)["q"] == "uint64"


def test_host_constants_match_the_sources():
    common = (cupy_kernels.source_dir() / "dma_common.cuh").read_text()
    pad = re.search(r"constexpr int SMEM_PAD = (\d+);", common)
    assert pad and int(pad.group(1)) == cupy_kernels.SMEM_PAD  # shared-memory sizes agree
    kernels = (cupy_kernels.source_dir() / cupy_kernels.KERNEL_HEADER).read_text()
    for name in (*cupy_kernels.KERNELS, *cupy_kernels.WGMMA_KERNELS.values(),
                 cupy_kernels.ROW_DELTA):  # all exist
        assert f" {name}(const Params p)" in kernels
    # Sizes the host computes the grid, shared memory and threads of each launch from.
    for name in ("ROW_DELTA_WARPS", "FORWARD_STAGES", "DQ_KV_BUFFERS", "DKDV_ROW_BUFFERS",
                 "WGMMA_PRODUCER_THREADS"):
        value = re.search(rf"constexpr int {name} = (\d+);", kernels)
        assert value and int(value.group(1)) == getattr(cupy_kernels, name), name


def _problem(**kw):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 24, 4, 64, generator=g, dtype=torch.float16)
    k = torch.randn(2, 24, 2, 64, generator=g, dtype=torch.float16)
    v = torch.randn(2, 24, 2, 64, generator=g, dtype=torch.float16)
    return validate(q, k, v, **kw)


def test_host_fields_fill_every_params_field():
    problem, inputs = _problem(causal=True)
    launch = LaunchArgs(problem, inputs, None)
    packed = cupy_kernels.pack_params(cupy_backend._fields(problem, launch))
    assert packed.dtype.itemsize == 8 * len(cupy_kernels.params_fields())
    assert packed["seqlen_q"][0] == 24 and packed["group"][0] == 2
    assert packed["q"][0] == inputs.q.data_ptr()
    assert np.isclose(packed["scale"][0], 64 ** -0.5)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_launches_pick_the_instantiation_compiled_for_their_softcap(softcap):
    # The attention kernels take the softcap as a template flag: a call with one must launch
    # the `true` instantiation, one without the `false` one; row delta has no such flag.
    problem, inputs = _problem(causal=True, softcap=softcap)
    launch = LaunchArgs(problem, inputs, None)
    for kernel in (*cupy_kernels.KERNELS, *cupy_kernels.WGMMA_KERNELS.values()):
        _, fields = cupy_backend._kernel_fields(kernel, problem, launch)
        flag = cupy_kernels.compiled_softcap(kernel, fields)
        assert flag == (softcap is not None)
        name = cupy_kernels.instantiation(kernel, problem.dtype, 64, flag)
        assert name.endswith("true>" if softcap else "false>")
    fields = dict(cupy_backend._fields(problem, launch), has_softcap=1)
    assert not cupy_kernels.compiled_softcap(cupy_kernels.ROW_DELTA, fields)


def test_row_delta_launch_fills_every_field_and_covers_every_row(monkeypatch):
    # The row delta's launch (no GPU: the launch is caught) packs a whole Params with o's
    # and do's own strides, and its grid's warps cover every row of every head.
    problem, _ = _problem()
    o = torch.randn(2, 4, 24, 64, dtype=torch.float16).transpose(1, 2)  # not contiguous
    do = torch.randn(2, 24, 4, 72, dtype=torch.float16)[..., :64]
    seen = {}

    def catch(kernel, dtype, d_pad, grid, device, fields):
        seen.update(kernel=kernel, grid=grid, packed=cupy_kernels.pack_params(fields))

    monkeypatch.setattr(cupy_kernels, "launch", catch)
    delta = cupy_backend.CupyBackend().row_delta(problem, o, do)
    packed = seen["packed"]
    assert seen["kernel"] == cupy_kernels.ROW_DELTA and delta.shape == (2, 4, 24)
    assert packed["out"][0] == o.data_ptr() and packed["dout"][0] == do.data_ptr()
    assert packed["delta"][0] == delta.data_ptr()
    assert (packed["so_b"][0], packed["so_s"][0], packed["so_h"][0]) == o.stride()[:3]
    assert (packed["sq_b"][0], packed["sq_s"][0], packed["sq_h"][0]) == do.stride()[:3]
    assert (packed["slse_b"][0], packed["slse_h"][0]) == delta.stride()[:2]
    assert packed["head_dim"][0] == 64 and packed["heads"][0] == 4
    rows, heads = seen["grid"]
    assert rows * cupy_kernels.ROW_DELTA_WARPS >= 24 and heads == 2 * 4


@pytest.mark.parametrize("kernel, by_key", [("dma_forward", False),
                                             ("dma_forward_wgmma", False),
                                             ("dma_backward_dq_wgmma", False),
                                             ("dma_backward_dkdv_wgmma", True),
                                             ("dma_backward_dq", False),
                                             ("dma_backward_dkdv", True)])
def test_mask_tile_lists_are_owned_by_the_arguments_that_reach_the_launch(kernel, by_key):
    # The fields hold bare pointers to the lists: the arguments returned beside them must own
    # the lists (a dropped owner let the allocator reuse them before the launch).
    mask = document_mask(document_ids(24, 3, "cpu"))
    problem, inputs = _problem(causal=True, attn_mask=mask)
    listed, fields = cupy_backend._kernel_fields(kernel, problem, LaunchArgs(problem, inputs, None),
                                                 by_key)
    lists, counts = listed.candidates[:2]
    assert fields["tile_list"] == 1
    assert fields["candidates"] == lists.data_ptr()
    assert fields["candidate_count"] == counts.data_ptr()
    assert fields["full_count"] == listed.full_count.data_ptr()
    block_m, block_n = cupy_kernels.tiles(kernel, problem.dtype, 64)
    assert fields["plan_block"] == block_m
    tiles_of = -(-24 // (block_n if by_key else block_m))  # lists per row block or key tile
    assert counts.shape[-1] == tiles_of


@pytest.mark.parametrize("hopper", [False, True])
def test_the_backward_counts_an_explicit_mask_once(hopper):
    # dq's and dk/dv's tiles differ (the warpgroup kernels' even transpose each other): the
    # backward counts the mask at their common tile, and both kernels' lists sum it.
    mask = document_mask(document_ids(300, 3, "cpu"))
    problem, inputs = _problem(causal=True, attn_mask=mask[:, :, :24, :24])
    launch = LaunchArgs(problem, inputs, None)
    pick = {k: (cupy_kernels.WGMMA_KERNELS[k] if hopper else k)
            for k in ("dma_backward_dq", "dma_backward_dkdv")}
    dq = cupy_kernels.tiles(pick["dma_backward_dq"], torch.float16, 64)
    dkdv = cupy_kernels.tiles(pick["dma_backward_dkdv"], torch.float16, 64)
    launch.count_mask_tiles(*map(math.gcd, dq, dkdv))
    by_key = launch.with_live_tiles(*dkdv, by_key=True)
    by_row = launch.with_live_tiles(*dq)
    assert len(launch._mask_tiles._counted) == 1
    assert by_key.candidates[1].shape[-1] == -(-24 // dkdv[1])
    assert by_row.candidates[1].shape[-1] == -(-24 // dq[0])


def test_pack_params_matches_a_field_by_field_struct():
    # The one-call struct packing against numpy setting each field of the structured dtype.
    problem, inputs = _problem(causal=True, softcap=30.0, scale=0.1)
    fields = cupy_backend._fields(problem, LaunchArgs(problem, inputs, None))
    fields = dict(fields, dq=2**63 + 16, seqlen_k=-3)  # the top pointer bit and a negative
    reference = np.zeros(1, dtype=np.dtype(list(cupy_kernels.params_fields())))
    for name, _ in cupy_kernels.params_fields():
        reference[name] = fields[name]
    packed = cupy_kernels.pack_params(fields)
    assert packed.dtype == reference.dtype and packed.shape == (1,)
    assert packed.tobytes() == reference.tobytes()
    assert packed.flags.writeable


def test_the_launch_argument_is_the_packed_bytes_without_fields():
    # What launch hands cupy: the same bytes at the same address, as one opaque struct
    # (cupy reads it through __array_interface__, slow for a type of 92 fields).
    problem, inputs = _problem(causal=True, softcap=30.0)
    packed = cupy_kernels.pack_params(cupy_backend._fields(problem, LaunchArgs(problem, inputs,
                                                                               None)))
    argument = cupy_kernels.by_value(packed)
    assert argument.shape == (1,) and argument.dtype.fields is None
    assert argument.dtype.itemsize == packed.dtype.itemsize
    assert argument.tobytes() == packed.tobytes()
    assert argument.__array_interface__["data"][0] == packed.__array_interface__["data"][0]


def test_pack_params_rejects_missing_and_unknown_fields():
    fields = {name: 0 for name, _ in cupy_kernels.params_fields()}
    cupy_kernels.pack_params(fields)
    with pytest.raises(ValueError, match="missing.*'softcap'"):
        cupy_kernels.pack_params({k: v for k, v in fields.items() if k != "softcap"})
    with pytest.raises(ValueError, match="unknown.*'bogus'"):
        cupy_kernels.pack_params({**fields, "bogus": 1})


def test_tiles_fit_every_supported_card():
    # 163 KiB of shared memory per block on sm_80 (the smallest opt-in limit served).
    for kernel, dtype, d_pad in cupy_kernels.all_instantiations():
        assert cupy_kernels.shared_bytes(kernel, dtype, d_pad) <= 163 * 1024
        for tile in cupy_kernels.tiles(kernel, dtype, d_pad):
            assert tile in (32, 64, 128) and cupy_backend.COARSE_ROWS % tile == 0
            assert cupy_backend.BLOCK_M % tile == 0  # a tile never straddles two plan blocks


def test_warpgroup_kernels_fit_hopper_and_cover_their_tiles():
    # 227 KiB of shared memory per block on sm_90; a producer warpgroup and two that compute,
    # 64 rows (forward, dq) or 64 keys (dk/dv) each. The producer copies with one thread per
    # row of a 128-row tile, or two warps per 64-row tile (copy_rows_of_lanes): the forward's
    # Q, K, V and dq's Q, dO (128 rows), dq's K and V, dk/dv's Q and dO (64 rows each), dk/dv's
    # K and V (128). Tiles of whole plan and coarse blocks.
    shapes = {cupy_kernels.WGMMA_FORWARD: (128, 128), cupy_kernels.WGMMA_DQ: (128, 64),
              cupy_kernels.WGMMA_DKDV: (64, 128)}
    for kernel, dtype, d_pad in cupy_kernels.wgmma_instantiations():
        block_m, block_n = cupy_kernels.tiles(kernel, dtype, d_pad)
        assert (block_m, block_n) == shapes[kernel]
        assert cupy_kernels.shared_bytes(kernel, dtype, d_pad) <= 227 * 1024
        assert cupy_kernels.threads(kernel, dtype, d_pad) == 3 * 128
        assert cupy_backend.BLOCK_M % block_m == 0 and cupy_backend.COARSE_ROWS % block_m == 0


@pytest.mark.parametrize("kernel", ["dma_forward", "dma_backward_dq", "dma_backward_dkdv"])
def test_hopper_kernel_picks_the_warpgroup_kernels_only_where_they_serve(kernel, monkeypatch):
    pick = cupy_kernels.hopper_kernel
    wgmma = cupy_kernels.WGMMA_KERNELS[kernel]
    monkeypatch.delenv("DMA_CUPY_WGMMA", raising=False)
    assert pick(kernel, torch.bfloat16, 128, (9, 0), True) == wgmma
    assert pick(kernel, torch.float16, 64, (9, 0), True) == wgmma
    assert pick(kernel, torch.bfloat16, 128, (8, 0), True) == kernel  # no warpgroup products
    assert pick(kernel, torch.bfloat16, 128, (10, 0), True) == kernel  # sm_90a code only
    assert pick(kernel, torch.float32, 128, (9, 0), True) == kernel
    assert pick(kernel, torch.bfloat16, 256, (9, 0), True) == kernel
    assert pick(kernel, torch.bfloat16, 32, (9, 0), True) == kernel
    assert pick(kernel, torch.bfloat16, 128, (9, 0), False) == kernel  # unaligned rows
    monkeypatch.setenv("DMA_CUPY_WGMMA", "0")
    assert pick(kernel, torch.bfloat16, 128, (9, 0), True) == kernel


def test_warps_cover_their_tiles():
    # The launcher's thread counts match the kernels' warp layouts: forward and dq warps own
    # warp_rows query rows each, and at least one thread per key stages a tile's ids; dk/dv
    # warps own 16 keys and at least one thread per row stages lse and delta.
    for kernel, dtype, d_pad in cupy_kernels.all_instantiations():
        block_m, block_n = cupy_kernels.tiles(kernel, dtype, d_pad)
        threads = cupy_kernels.threads(kernel, dtype, d_pad)
        if kernel == "dma_backward_dkdv":
            assert threads == 2 * block_n and threads >= block_m
        else:
            rows = cupy_kernels.warp_rows(kernel, dtype, d_pad)
            assert threads // 32 * rows == block_m and threads >= block_n
            for softcap in (False, True):
                name = cupy_kernels.instantiation(kernel, dtype, d_pad, softcap)
                assert name.count(",") == (5 if kernel == "dma_forward" else 4)
                assert name.endswith("true>" if softcap else "false>")


def test_vector_loads_need_aligned_whole_rows():
    problem, inputs = _problem()
    assert cupy_backend._vector_loads(problem, (inputs.q, inputs.k))
    assert not cupy_backend._vector_loads(problem, (inputs.q[:, :, :, 1:],))
    odd, odd_inputs = validate(*(torch.randn(1, 8, 2, 20, dtype=torch.float16),) * 3)
    assert not cupy_backend._vector_loads(odd, (odd_inputs.q,))


def test_forward_ablation_finds_each_stage_in_the_kernel(tmp_path):
    # benchmarks/ablate_cupy_forward.py cuts stages out of the warpgroup forward's source by
    # pattern: each cut must find its stage in the kernel as it is now.
    ablate = benchmark_script("ablate_cupy_forward")
    original = (cupy_kernels.source_dir() / "dma_attention.cuh").read_text()
    for variant in ablate.VARIANTS:
        folder = ablate.variant_sources(variant, cupy_kernels.source_dir(), tmp_path / variant)
        text = (folder / "dma_attention.cuh").read_text()
        assert (text == original) == (variant == "base"), variant


def test_kernels_compile_from_the_folder_that_dma_cupy_sources_names(tmp_path, monkeypatch):
    # A changed copy of the sources (kernel experiments) replaces the package's at each
    # launch, keys the loaded kernels by its own program text, and must keep the Params
    # layout that the launcher packs.
    package = cupy_kernels.package_sources()
    monkeypatch.delenv("DMA_CUPY_SOURCES", raising=False)
    assert cupy_kernels.source_dir() == package
    copy = tmp_path / "cuda"
    shutil.copytree(package, copy)
    monkeypatch.setenv("DMA_CUPY_SOURCES", str(copy))
    assert cupy_kernels.source_dir() == copy
    cupy_kernels.check_params_header(copy)
    assert cupy_kernels._program(copy) == cupy_kernels._program(package)
    header = copy / "dma_attention.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    cupy_kernels._program.cache_clear()
    assert cupy_kernels._program(copy) != cupy_kernels._program(package)

    params = copy / cupy_kernels.PARAMS_HEADER
    params.write_text(params.read_text().replace("long long", "long  long", 1))
    with pytest.raises(ValueError, match="DMA_CUPY_SOURCES.*differs"):
        cupy_kernels.check_params_header(copy)
    params.unlink()
    with pytest.raises(ValueError, match="DMA_CUPY_SOURCES.*holds no"):
        cupy_kernels.check_params_header(copy)
