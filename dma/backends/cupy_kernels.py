"""Compile and launch the cupy backend's CUDA kernels (sources in dma/backends/cuda/).

The sources ship inside the package and compile through NVRTC (cupy.RawModule) on first use,
one module per template instantiation and device. The program is a single `#include` of the
kernel header, so compile errors name the real file and line. Kernels take one `Params`
struct by value; its host layout is read from dma_params.cuh, so it cannot drift from the
device side. Launches go on PyTorch's current stream and never synchronise the host.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import warnings
from contextlib import ExitStack
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

KERNEL_HEADER = "dma_attention.cuh"
PARAMS_HEADER = "dma_params.cuh"
KERNELS = ("dma_forward", "dma_backward_dq", "dma_backward_dkdv")
ELEMENT_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
HEAD_DIM_PADS = (16, 32, 64, 128, 256)
# The kernels on Hopper's warpgroup products (compiled for sm_90a; dma_attention.cuh), by the
# kernel they stand in for: 16-bit types at these padded head dims, rows of whole
# 16-byte vectors.
WGMMA_FORWARD = "dma_forward_wgmma"
WGMMA_DQ = "dma_backward_dq_wgmma"
WGMMA_DKDV = "dma_backward_dkdv_wgmma"
WGMMA_KERNELS = {"dma_forward": WGMMA_FORWARD, "dma_backward_dq": WGMMA_DQ,
                 "dma_backward_dkdv": WGMMA_DKDV}
WGMMA_DTYPES = (torch.float16, torch.bfloat16)
WGMMA_HEAD_DIM_PADS = (64, 128)
WGMMA_ALIGNMENT = 1024  # its swizzled tiles start 1024-byte aligned (slack in shared_bytes)
# The backward's first step, delta = rowsum(dO * O): one warp per row, ROW_DELTA_WARPS rows
# per program (dma_attention.cuh); one instantiation per element type.
ROW_DELTA = "dma_row_delta"
ROW_DELTA_WARPS = 8
SMEM_PAD = 8  # elements added to each shared row (SMEM_PAD in dma_common.cuh)
FORWARD_STAGES = 2  # K and V buffers each of the warpgroup forward (FORWARD_STAGES there too)
DQ_KV_BUFFERS = 3  # K/V buffers of the warpgroup dq (DQ_KV_BUFFERS in dma_attention.cuh)
DKDV_ROW_BUFFERS = 3  # Q/dO row buffers of the warpgroup dk/dv (DKDV_ROW_BUFFERS there too)
# Threads of the warpgroup kernels: a producer warpgroup and two that compute
# (WGMMA_PRODUCER_THREADS in dma_attention.cuh).
WGMMA_PRODUCER_THREADS = 384
_FIELD = re.compile(r"^\s*(const void\*|void\*|const float\*|float\*|long long|double)\s+(\w+);",
                    re.M)
_sources = ExitStack()


@lru_cache(maxsize=1)
def package_sources() -> Path:
    """The package's folder of .cuh sources, as a real path (extracted if the package is
    zipped)."""
    return Path(_sources.enter_context(resources.as_file(resources.files(__package__) / "cuda")))


def source_dir() -> Path:
    """The folder the kernels compile from: DMA_CUPY_SOURCES, a changed copy of the
    package's sources for kernel experiments (read at each launch, so a benchmark can
    switch between copies), or the package's own."""
    override = os.environ.get("DMA_CUPY_SOURCES")
    return Path(override) if override else package_sources()


@lru_cache(maxsize=1)
def params_fields() -> tuple:
    """(name, numpy type name) of every Params field, in declaration order."""
    text = (package_sources() / PARAMS_HEADER).read_text()
    body = text[text.index("struct Params {"):]
    body = body[:body.index("};")]
    kinds = {"long long": "int64", "double": "float64"}
    return tuple((name, kinds.get(kind, "uint64")) for kind, name in _FIELD.findall(body))


@lru_cache(maxsize=1)
def _params_packing():
    """(field names, their set, a struct format of them in order, the numpy dtype) for
    `pack_params`. Every field is 8 bytes, so the struct has no padding."""
    import numpy as np

    layout = params_fields()
    codes = {"uint64": "Q", "int64": "q", "float64": "d"}
    names = tuple(name for name, _ in layout)
    fmt = struct.Struct("<" + "".join(codes[kind] for _, kind in layout))
    return names, frozenset(names), fmt, np.dtype(list(layout))


def pack_params(fields: dict):
    """One Params struct as a size-one numpy array (cupy passes those by value). Every field
    must be given, and nothing else. Packed in one struct.pack call: setting a structured
    array's fields one by one took about 64 us per launch for its 90 fields."""
    import numpy as np

    names, name_set, fmt, dtype = _params_packing()
    if fields.keys() != name_set:
        missing = [name for name in names if name not in fields]
        extra = sorted(set(fields) - name_set)
        raise ValueError(f"Params fields: missing {missing}, unknown {extra}")
    return np.frombuffer(bytearray(fmt.pack(*[fields[name] for name in names])), dtype=dtype)


def by_value(packed):
    """`packed` (pack_params) viewed as one opaque struct of its bytes, the kernel argument
    cupy passes by value. cupy finds the bytes through `__array_interface__`, which for the
    structured type describes each of its 92 fields anew: 86 us of host time per launch on
    a 2-core x86 machine, against 4 us for the opaque view."""
    return packed.view(_opaque_params_type())


@lru_cache(maxsize=1)
def _opaque_params_type():
    import numpy as np

    return np.dtype((np.void, _params_packing()[2].size))


def tile_size(dtype: torch.dtype, d_pad: int) -> int:
    """Query rows (forward, dq) and keys (dk/dv) per tile: 64, or 32 when a row of the tile
    is over 256 bytes."""
    return 64 if d_pad * dtype.itemsize <= 256 else 32


def warp_rows(kernel: str, dtype: torch.dtype, d_pad: int) -> int:
    """Query rows per warp (forward, dq): 32 in the forward for tensor-core types up to head
    dim 128, as two fragments that share every K and V fragment they read (half the shared
    memory reads per product; the accumulators still fit in registers), else 16."""
    return 32 if kernel == "dma_forward" and dtype != torch.float32 and d_pad <= 128 else 16


def tiles(kernel: str, dtype: torch.dtype, d_pad: int) -> tuple:
    """(BLOCK_M, BLOCK_N) of a kernel: rows and keys per tile. The forward with 32-row warps
    takes 128 rows and 32-key tiles (64 keys would spill its registers); the warpgroup
    forward 128 rows (two groups of 64) and 128-key tiles (a warp holds one score tile), dq
    128 rows and 64-key tiles, the warpgroup dk/dv 128 keys (two groups of 64) and 64-row
    tiles. dk/dv walk rows 32 at a time from head dim 64 up: its transposed score tiles then
    fit in registers beside dk and dv."""
    if kernel == WGMMA_DKDV:
        return 64, 128
    if kernel == WGMMA_FORWARD:
        return 128, 128
    if kernel in WGMMA_KERNELS.values():
        return 128, 64
    if warp_rows(kernel, dtype, d_pad) == 32:
        return 128, 32
    tile = tile_size(dtype, d_pad)
    if kernel == "dma_backward_dkdv" and d_pad >= 64:
        return 32, tile
    return tile, tile


@lru_cache(maxsize=None)  # read on every launch
def threads(kernel: str, dtype: torch.dtype, d_pad: int) -> int:
    """One warp per warp_rows rows (forward, dq) or per 16 keys (dk/dv); the warpgroup
    kernels three warpgroups; row delta ROW_DELTA_WARPS warps."""
    if kernel == ROW_DELTA:
        return ROW_DELTA_WARPS * 32
    block_m, block_n = tiles(kernel, dtype, d_pad)
    if kernel in WGMMA_KERNELS.values():
        return WGMMA_PRODUCER_THREADS
    if kernel == "dma_backward_dkdv":
        return 2 * block_n
    return block_m // warp_rows(kernel, dtype, d_pad) * 32


def dkdv_row_buffers(dtype: torch.dtype, d_pad: int) -> int:
    """Buffers of (Q, dO) row tiles in dk/dv: two (the next tile's copies overlap this one's
    products) unless a row is 1 KiB or more (ROW_BUFFERS in dma_attention.cuh)."""
    return 1 if d_pad * dtype.itemsize >= 1024 else 2


@lru_cache(maxsize=None)  # read on every launch
def shared_bytes(kernel: str, dtype: torch.dtype, d_pad: int) -> int:
    """Dynamic shared memory of one program: the tiles its kernel declares (none in row
    delta)."""
    if kernel == ROW_DELTA:
        return 0
    block_m, block_n = tiles(kernel, dtype, d_pad)
    if kernel in WGMMA_KERNELS.values():  # unpadded (swizzled) tiles
        rows = {WGMMA_FORWARD: block_m + 2 * FORWARD_STAGES * block_n,  # q; k and v
                WGMMA_DQ: 2 * block_m + 2 * DQ_KV_BUFFERS * block_n,  # q, do; k and v
                WGMMA_DKDV: 2 * block_n + 2 * DKDV_ROW_BUFFERS * block_m}[kernel]  # k, v; q, do
        return rows * d_pad * dtype.itemsize + WGMMA_ALIGNMENT
    rows = d_pad + SMEM_PAD
    # float32 stages its score tiles in shared memory on their way to a product (the
    # tensor-core types keep them in registers): p (forward), ds (dq), p and ds transposed
    # (dk/dv).
    staging = dtype == torch.float32
    if kernel == "dma_forward":  # q; k, v
        elements = block_m * rows + 2 * block_n * rows + staging * block_m * (block_n + SMEM_PAD)
    elif kernel == "dma_backward_dq":  # q, do; k, v
        elements = (2 * block_m * rows + 2 * block_n * rows
                    + staging * block_m * (block_n + SMEM_PAD))
    else:  # k, v; q, do (one or two buffers)
        elements = (2 * block_n * rows + 2 * dkdv_row_buffers(dtype, d_pad) * block_m * rows
                    + staging * block_n * (block_m + SMEM_PAD))
    return elements * dtype.itemsize


def instantiation(kernel: str, dtype: torch.dtype, d_pad: int, softcap: bool) -> str:
    """The template instantiation that runs `kernel`: the attention kernels take the softcap
    as a compile-time flag (no per-pair branch on it), so each has two."""
    if kernel == ROW_DELTA:  # any head dim, no softcap
        return f"{kernel}<{ELEMENT_TYPES[dtype]}>"
    block_m, block_n = tiles(kernel, dtype, d_pad)
    flag = "true" if softcap else "false"
    if kernel == WGMMA_DKDV:
        return f"{kernel}<{ELEMENT_TYPES[dtype]}, {d_pad}, {block_m}, {block_n}, {flag}>"
    if kernel in WGMMA_KERNELS.values():
        return f"{kernel}<{ELEMENT_TYPES[dtype]}, {d_pad}, {block_n}, {flag}>"
    rows = f", {warp_rows(kernel, dtype, d_pad)}" if kernel == "dma_forward" else ""
    return f"{kernel}<{ELEMENT_TYPES[dtype]}, {d_pad}, {block_m}, {block_n}{rows}, {flag}>"


def softcap_flags(kernel: str) -> tuple:
    """The softcap flags `kernel` is compiled with: both, but none for row delta."""
    return (False,) if kernel == ROW_DELTA else (False, True)


def all_instantiations():
    """Every (kernel, dtype, padded head dim) the backend can launch on any target."""
    return [(kernel, dtype, d_pad) for kernel in KERNELS for dtype in ELEMENT_TYPES
            for d_pad in HEAD_DIM_PADS]


def row_delta_instantiations():
    """Row delta's instantiations, one per element type (its head dim slot is 0)."""
    return [(ROW_DELTA, dtype, 0) for dtype in ELEMENT_TYPES]


def wgmma_instantiations():
    """Every (kernel, dtype, padded head dim) of the warpgroup kernels (sm_90a only)."""
    return [(kernel, dtype, d_pad) for kernel in WGMMA_KERNELS.values()
            for dtype in WGMMA_DTYPES for d_pad in WGMMA_HEAD_DIM_PADS]


def hopper_kernel(kernel: str, dtype: torch.dtype, d_pad: int, capability: tuple,
                  vector_loads: bool) -> str:
    """The kernel that runs `kernel` (any of WGMMA_KERNELS' keys) for a problem: its
    warpgroup version on compute capability 9.0 where that serves (DMA_CUPY_WGMMA=0 turns
    them off), else `kernel` itself."""
    if (kernel in WGMMA_KERNELS and capability == (9, 0) and dtype in WGMMA_DTYPES
            and d_pad in WGMMA_HEAD_DIM_PADS and vector_loads
            and os.environ.get("DMA_CUPY_WGMMA", "1") != "0"):
        return WGMMA_KERNELS[kernel]
    return kernel


def check_params_header(folder: Path) -> None:
    """Sources from another folder (DMA_CUPY_SOURCES) must declare the Params that the
    launcher packs: the package's own dma_params.cuh."""
    if folder == package_sources():
        return
    theirs = folder / PARAMS_HEADER
    if not theirs.is_file():
        raise ValueError(f"DMA_CUPY_SOURCES={folder} holds no {PARAMS_HEADER}: it must name a "
                         "copy of the package's dma/backends/cuda/ folder")
    if theirs.read_text() != (package_sources() / PARAMS_HEADER).read_text():
        raise ValueError(f"DMA_CUPY_SOURCES={folder}: its {PARAMS_HEADER} differs from the "
                         "package's, whose Params layout the launcher packs")


@lru_cache(maxsize=8)
def _program(folder: Path) -> str:
    # The digest of the sources keys cupy's on-disk cache, which sees only this text.
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.cuh")):
        digest.update(path.read_bytes())
    return f"// sources {digest.hexdigest()}\n#include \"{KERNEL_HEADER}\"\n"


# Loaded kernels by device, instantiation, sources folder and extra options.
_functions: dict = {}


def _extra_options() -> tuple:
    """Extra NVRTC options from DMA_CUPY_OPTIONS (space separated), for tuning experiments
    such as -DDMA_FORWARD_MIN_BLOCKS=3; read at each launch (a new value compiles anew)."""
    return tuple(os.environ.get("DMA_CUPY_OPTIONS", "").split())


def _cache_dir() -> Path:
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def _hopper_function(name: str, folder: Path, extra_options: tuple):
    """One kernel compiled for sm_90a through NVRTC directly (cupy.RawModule adds its own
    -arch for the device, sm_90, and refuses a second one; warpgroup products need the
    architecture-specific target). Cached on disk by the sources, options and NVRTC
    version, as cupy caches its own."""
    import cupy

    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:  # older layouts
        from cupy.cuda import nvrtc

    options = ["--std=c++17", f"-I{folder}", "-arch=sm_90a", "-default-device",
               *extra_options]
    key = hashlib.sha256("\n".join([_program(folder), name, *options,
                                    str(nvrtc.getVersion())]).encode()).hexdigest()
    path = _cache_dir() / f"dma_{key}.bin"
    if path.exists():
        lowered, cubin = path.read_bytes().split(b"\0", 1)
        lowered = lowered.decode()
    else:
        program = nvrtc.createProgram(_program(folder), "dma_program.cu", [], [])
        try:
            nvrtc.addNameExpression(program, name)
            try:
                nvrtc.compileProgram(program, options)
            except nvrtc.NVRTCError as error:
                raise RuntimeError(f"NVRTC could not compile {name}:\n"
                                   f"{nvrtc.getProgramLog(program)}") from error
            lowered, cubin = nvrtc.getLoweredName(program, name), nvrtc.getCUBIN(program)
        finally:
            nvrtc.destroyProgram(program)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_bytes(lowered.encode() + b"\0" + cubin)
        partial.replace(path)  # atomic: concurrent writers leave one whole file
    module = cupy.cuda.function.Module()
    module.load(cubin)
    return module, module.get_function(lowered)


def _function(device_index: int, kernel: str, dtype: torch.dtype, d_pad: int, softcap: bool):
    folder, extra_options = source_dir(), _extra_options()
    key = (device_index, kernel, dtype, d_pad, softcap, folder, extra_options)
    if key not in _functions:
        import cupy

        check_params_header(folder)
        name = instantiation(kernel, dtype, d_pad, softcap)
        with cupy.cuda.Device(device_index):
            if kernel in WGMMA_KERNELS.values():
                module, function = _hopper_function(name, folder, extra_options)
            else:
                module = cupy.RawModule(code=_program(folder), name_expressions=[name],
                                        options=("--std=c++17", f"-I{folder}",
                                                 *extra_options))
                function = module.get_function(name)
            # Over 48 KiB of dynamic shared memory needs the function's limit raised.
            smem = shared_bytes(kernel, dtype, d_pad)
            try:
                function.max_dynamic_shared_size_bytes = smem
            except AttributeError:  # cupy versions without the property
                driver = cupy.cuda.driver
                driver.funcSetAttribute(
                    function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        _functions[key] = (module, function)  # the module owns the function's code
    return _functions[key][1]


@lru_cache(maxsize=64)
def _stream(device_index: int, handle: int):
    """A cupy view of a torch stream (kept alive by torch; views are cached by handle)."""
    import cupy

    try:  # cupy >= 14: the CUDA stream protocol
        return cupy.cuda.Stream.from_external(_StreamHandle(handle))
    except Exception:  # older cupy (no from_external) or a protocol it does not take
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(handle, device_index)


class _StreamHandle:
    """The CUDA stream protocol (__cuda_stream__) for a raw stream handle."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def compiled_softcap(kernel: str, fields: dict) -> bool:
    """The softcap flag of the instantiation that serves a launch of `kernel` with `fields`."""
    return kernel != ROW_DELTA and bool(fields["has_softcap"])


def launch(kernel: str, dtype: torch.dtype, d_pad: int, grid: tuple, device: torch.device,
           fields: dict):
    """Launch one kernel on the current torch stream of `device`: its instantiation for the
    softcap flag in `fields`."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(index, kernel, dtype, d_pad, compiled_softcap(kernel, fields))
    params = by_value(pack_params(fields))
    stream = _stream(index, torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(index):
        function(grid, (threads(kernel, dtype, d_pad),), (params,),
                 shared_mem=shared_bytes(kernel, dtype, d_pad), stream=stream)
