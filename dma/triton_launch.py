"""Triton launches with little host time.

`kernel[grid](*args)` binds and specialises every argument on every call: 40 to 75 us of host
time for the attention kernels (about 70 arguments) on an H200 host, which is more than the
GPU time of a short call (a 4096-token forward ran host-bound: 1.0 ms of host time for 0.7 ms
of GPU work). `run_kernel` keeps, per kernel, the compiled kernel of every argument
specialisation it has seen and launches it directly (about 15 us).

The key is at least as fine as Triton's own: tensors by dtype and 16-byte alignment, integers
by whether they are 1, divisible by 16 and fit in 32 bits, constexprs and launch options by
value. The first call of a key goes through Triton's normal path (which compiles, or loads
from its disk cache). Under TRITON_INTERPRET=1, with DMA_TRITON_DIRECT_LAUNCH=0, or if the
installed Triton lacks the compiled kernel's launch interface, every call takes the normal
path.
"""

from __future__ import annotations

import os

import torch

_compiled: dict = {}  # specialisation key -> compiled kernel
_direct = {"ok": True}


def _spec(value):
    """What Triton may specialise a non-constexpr argument on."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31, value < 2**63)
    if isinstance(value, float):
        return ("float",)
    return ("value", value)


def direct_launch_enabled() -> bool:
    return (_direct["ok"] and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("DMA_TRITON_DIRECT_LAUNCH", "1") != "0")


def run_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, reusing the compiled kernel of an earlier launch with
    the same specialisation."""
    if direct_launch_enabled():
        try:
            if _launch_direct(kernel, grid, args, kwargs):
                return
        except (AttributeError, TypeError):  # a Triton without this interface
            _direct["ok"] = False
    kernel[grid](*args, **kwargs)


def _launch_direct(kernel, grid, args, kwargs) -> bool:
    """Launch a compiled kernel seen before; False when this specialisation is new (the
    caller then launches through Triton, and that compiled kernel is kept)."""
    names, constexpr = kernel.arg_names, set(kernel.constexprs)
    if any(name not in kwargs for name in names[len(args):]):
        return False  # a parameter left to its default: let Triton bind it
    values = list(args) + [kwargs[name] for name in names[len(args):]]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    key = (kernel, torch.cuda.current_device(), options,
           tuple(v if i in constexpr else _spec(v) for i, v in enumerate(values)))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return True
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)
    return True
