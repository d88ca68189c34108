"""The BLAS gemm the numba kernels call for their tile products.

The kernels receive a Fortran-ABI `?gemm_` as a function pointer argument (so their on-disk
cache stays valid across processes) and call it through `matmul`. Which gemm:

* torch's own MKL, when this torch build exports it (x86 builds do): about 1.5x faster than
  OpenBLAS on the 64 x 128 tiles the kernels multiply;
* otherwise scipy's BLAS (OpenBLAS in the wheels), through its Cython capsules.

Either way a call runs on one thread: the kernels already run one task per core
(`single_threaded_blas`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import lru_cache

import numpy as np
from numba import njit

_GEMM_TYPE = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)


@lru_cache(maxsize=None)
def _torch_mkl():
    """torch's CPU library when it exports MKL's gemm, else None."""
    if os.environ.get("DMA_NUMBA_BLAS", "").lower() == "scipy":
        return None
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        lib.sgemm_, lib.dgemm_  # noqa: B018 (both must be exported)
    except (OSError, AttributeError):
        return None
    return lib


def _scipy_gemm(name: str):
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return _GEMM_TYPE(get_pointer(capsule, get_name(capsule)))


@lru_cache(maxsize=None)
def gemm_function(dtype) -> ctypes._CFuncPtr:
    """The Fortran-ABI gemm for numpy float32 or float64 arrays."""
    name = "sgemm" if np.dtype(dtype) == np.float32 else "dgemm"
    lib = _torch_mkl()
    if lib is not None:
        return _GEMM_TYPE(ctypes.cast(getattr(lib, name + "_"), ctypes.c_void_p).value)
    return _scipy_gemm(name)


def blas_name() -> str:
    return "MKL (torch's)" if _torch_mkl() is not None else "scipy's BLAS"


def single_threaded_blas():
    """A context in which gemm calls run on one thread each: the kernels' tasks already use
    every core, so BLAS's own threads would only oversubscribe them."""
    if _torch_mkl() is not None:
        return _torch_threads(1)  # torch's setting is MKL's too
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@njit(cache=True)
def matmul(gemm, a, a_transposed, b, b_transposed, out, accumulate):
    """out = op(a) @ op(b) (+ out when accumulate) for row-major 2-D arrays whose rows are
    contiguous, op = transpose where flagged. BLAS is column-major, so it computes
    out^T = op(b)^T @ op(a)^T, reading each row-major array as its column-major transpose."""
    m, n = out.shape
    k = a.shape[0] if a_transposed else a.shape[1]
    size = a.itemsize
    ints = np.empty(6, np.int32)  # m, n, k and the three leading dimensions, as BLAS sees them
    ints[0], ints[1], ints[2] = n, m, k
    ints[3] = max(1, b.strides[0] // size)
    ints[4] = max(1, a.strides[0] // size)
    ints[5] = max(1, out.strides[0] // size)
    scalars = np.empty(2, a.dtype)
    scalars[0], scalars[1] = 1.0, 1.0 if accumulate else 0.0
    flags = np.empty(2, np.uint8)
    flags[0] = 84 if b_transposed else 78  # 'T' / 'N'
    flags[1] = 84 if a_transposed else 78
    i, s, f = ints.ctypes.data, scalars.ctypes.data, flags.ctypes.data
    gemm(f, f + 1, i, i + 4, i + 8, s, b.ctypes.data, i + 12, a.ctypes.data, i + 16, s + size,
         out.ctypes.data, i + 20)
