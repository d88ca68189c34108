"""Triton launches with little host time.

`kernel[grid](*args)` binds and specialises every argument on every call: 40 to 75 us of host
time for the attention kernels (about 70 arguments) on an H200 host, which is more than the
GPU time of a short call (a 4096-token forward ran host-bound: 1.0 ms of host time for 0.7 ms
of GPU work). `run_kernel` keeps, per kernel, the compiled kernel of every argument
specialisation it has seen and launches it directly: tensors as bare addresses, and without
the launch hooks' metadata when no hook is set.

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


def _scalar_spec(value):
    """What Triton may specialise a scalar argument on."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31, value < 2**63)
    if isinstance(value, float):
        return ("float",)
    return ("value", value)


_signatures: dict = {}  # kernel -> (argument names, their set, constexpr positions)


def _signature(kernel):
    sig = _signatures.get(kernel)
    if sig is None:
        names = tuple(kernel.arg_names)
        sig = _signatures[kernel] = (names, frozenset(names), frozenset(kernel.constexprs))
    return sig


def direct_launch_enabled() -> bool:
    return (_direct["ok"] and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("DMA_TRITON_DIRECT_LAUNCH", "1") != "0")


def run_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, reusing the compiled kernel of an earlier launch with
    the same specialisation.

    Floating-point contraction (a * b + c as one FMA) is asked for explicitly: the kernels
    are written for it (the softmax's exp2 argument is one multiply-add per score), and
    Triton announces that its default turns it off from 3.10 on."""
    kwargs.setdefault("enable_fp_fusion", True)
    if direct_launch_enabled():
        try:
            if _launch_direct(kernel, grid, args, kwargs):
                return
        except (AttributeError, TypeError):  # a Triton without this interface
            _direct["ok"] = False
    kernel[grid](*args, **kwargs)


def _launch_direct(kernel, grid, args, kwargs) -> bool:
    """Launch a compiled kernel seen before; False when this specialisation is new (the
    caller then launches through Triton, and that compiled kernel is kept).

    Tensors reach the compiled kernel as their addresses: Triton's launcher takes an integer
    as the pointer itself, where for a tensor it calls `data_ptr()` and asks the driver
    whether the address is a device one (the first launch of every specialisation, through
    Triton, still does)."""
    names, name_set, constexpr = _signature(kernel)
    if any(name not in kwargs for name in names[len(args):]):
        return False  # a parameter left to its default: let Triton bind it
    values = list(args)
    values += [kwargs[name] for name in names[len(args):]]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in name_set))
    spec = []
    for i, v in enumerate(values):
        if i in constexpr:
            spec.append(v)
        elif isinstance(v, torch.Tensor):
            address = v.data_ptr()
            spec.append((v.dtype, address % 16 == 0))
            values[i] = address
        else:
            spec.append(_scalar_spec(v))
    key = (kernel, torch.cuda.current_device(), options, tuple(spec))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return True
    _launch_compiled(compiled, tuple(grid) + (1,) * (3 - len(grid)), values)
    return True


def _launch_compiled(compiled, grid3: tuple, values: list) -> None:
    """`compiled[grid3](*values)`, without the launch hooks' metadata when no hook is set
    (Triton builds it, and calls both hooks, on every launch otherwise)."""
    enter, leave = _launch_hooks()
    if getattr(enter, "calls", True) or getattr(leave, "calls", True):
        compiled[grid3](*values)  # someone listens (a profiler): Triton's own path
        return
    stream = torch.cuda.current_stream().cuda_stream
    compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *values)


def _launch_hooks():
    """Triton's launch hooks (enter, exit): chains of callables, empty unless a profiler or
    a user registered one."""
    from triton import knobs

    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
