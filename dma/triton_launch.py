"""Triton launches with little host time.

`kernel[grid](*args)` binds and specialises every argument on every call: 40 to 75 us of host
time for the attention kernels (about 70 arguments) on an H200 host, which is more than the
GPU time of a short call (a 4096-token forward ran host-bound: 1.0 ms of host time for 0.7 ms
of GPU work). `run_kernel` keeps, per kernel, the compiled kernel of every argument
specialisation it has seen and launches it directly: tensors as bare addresses, and without
the launch hooks' metadata when no hook is set.

The key is at least as fine as Triton's own: the arguments' types, tensors by dtype and
distance past a 16-byte boundary, integers by whether they are 1, divisible by 16 and fit
in 32 (or 64) bits, constexprs and launch options by value. Building it is a few C-level
gathers per launch: what a call site fixes (which keywords are parameters, which are
launch options) is worked out once per site (`_CallSite`), and where each kind of argument
sits once per pattern of argument types (`_ArgLayout`). On an H200 host the lookup takes 6
to 15 us per launch (79-argument forward: 15), against 7.1 to 18.6 before call sites; the
compiled launcher itself 6 to 10 (`benchmarks/host_time.py --launches`). The first call of
a key goes through Triton's normal path (which compiles, or loads from its disk cache).
Kernels that Triton decorated for its interpreter (TRITON_INTERPRET=1 at import), every
kernel with DMA_TRITON_DIRECT_LAUNCH=0, and every kernel if the installed Triton lacks the
compiled kernel's launch interface take the normal path on every call.
"""

from __future__ import annotations

import operator
import os

import torch

_compiled: dict = {}  # specialisation key -> compiled kernel
_direct = {"ok": True}


_INT32_END, _INT64_END = 2**31, 2**63  # where Triton widens an integer argument

# Launch options every kernel gets unless the caller says otherwise. Floating-point
# contraction (a * b + c as one FMA) is asked for explicitly: the kernels are written for it
# (the softmax's exp2 argument is one multiply-add per score), and Triton announces that its
# default turns it off from 3.10 on.
DEFAULT_OPTIONS = {"enable_fp_fusion": True}


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton's block sizes."""
    return 1 << max(0, (n - 1).bit_length())


class _ArgLayout:
    """Where each kind of argument sits in one kernel's argument list, for one pattern of
    argument types (worked out once, so that a launch's key is a few C-level gathers rather
    than a Python step per argument): tensors (specialised by dtype and 16-byte alignment),
    integers (`_int_spec`), constexprs and bools (by value); floats only by type."""

    def __init__(self, constexpr, types):
        tensors, ints, by_value = [], [], []
        for i, kind in enumerate(types):
            if i in constexpr or kind is bool:
                by_value.append(i)
            elif issubclass(kind, torch.Tensor):
                tensors.append(i)
            elif kind is int:
                ints.append(i)
            elif kind is not float:
                by_value.append(i)
        self.tensor_positions = tuple(tensors)
        self.tensors = _getter(tensors)
        self.ints = _getter(ints)
        self.by_value = _getter(by_value)


class _CallSite:
    """What one way of calling a kernel fixes (how many arguments come by position, and the
    keywords in the order given): which keywords are parameters (taken in the kernel's
    order) and which are launch options (num_warps..., in sorted order), and whether every
    parameter is given. Worked out once per call site, not per launch."""

    def __init__(self, kernel, n_args: int, keywords: tuple):
        names, name_set, self.constexpr, _ = _signature(kernel)
        parameters = names[n_args:]
        self.complete = set(keywords) >= set(parameters)
        self.keyword_values = _getter(parameters)
        self.option_values = _getter(sorted(k for k in keywords if k not in name_set))
        self.layouts: dict = {}  # argument types -> _ArgLayout


def _getter(positions):
    """A function from a list (or dict) to the tuple of its items at `positions` (indices
    or keys)."""
    if not positions:
        return lambda values: ()
    if len(positions) == 1:
        only = positions[0]
        return lambda values: (values[only],)
    return operator.itemgetter(*positions)


# Both keyed by id(kernel): a JITFunction hashes its source's cache key in Python, twice per
# launch otherwise. `_signatures` keeps each kernel alive, so that its id is never reused.
_signatures: dict = {}  # id(kernel) -> (argument names, their set, constexpr positions, kernel)
_call_sites: dict = {}  # (id(kernel), positional count, keywords) -> _CallSite


def _signature(kernel):
    sig = _signatures.get(id(kernel))
    if sig is None:
        names = tuple(kernel.arg_names)
        sig = _signatures[id(kernel)] = (names, frozenset(names), frozenset(kernel.constexprs),
                                         kernel)
    return sig


_data_ptr = torch.Tensor.data_ptr
_dtype_of = operator.attrgetter("dtype")
_misalignment = (15).__and__  # an address's distance past a 16-byte boundary


_int_specs: dict = {}  # integer arguments' values -> number of their specialisation
_int_spec_numbers: dict = {}  # specialisation -> its number
_INT_SPECS_KEPT = 4096  # distinct value tuples remembered (decoding's lengths grow per step)


def _int_spec(ints: tuple) -> int:
    """What Triton specialises integers on (whether each is 1, divisible by 16 and fits in
    32 or 64 bits), as a number. Remembered per tuple of values: hashing the values is far
    cheaper than testing each of them again on every launch."""
    number = _int_specs.get(ints)
    if number is None:
        if len(_int_specs) >= _INT_SPECS_KEPT:
            _int_specs.clear()
        spec = tuple((v == 1, v % 16 == 0, -_INT32_END <= v < _INT32_END, v < _INT64_END)
                     for v in ints)
        number = _int_specs[ints] = _int_spec_numbers.setdefault(spec, len(_int_spec_numbers))
    return number


def _driver_function(name: str):
    """The active driver's function `name`, looked up once."""
    function = _triton.get(name)
    if function is None:
        function = _triton[name] = getattr(_driver(), name)
    return function


def _current_device() -> int:
    return _driver_function("get_current_device")()


def _current_stream(device: int) -> int:
    return _driver_function("get_current_stream")(device)


_triton = {}  # Triton's modules, imported on first use


def _driver():
    if "driver" not in _triton:
        from triton.runtime import driver

        _triton["driver"] = driver
    return _triton["driver"].active


def _interpreted(kernel) -> bool:
    """Whether `kernel` runs under Triton's interpreter: Triton decides when it decorates a
    function (TRITON_INTERPRET=1 then), so the kernel's type says it (no environment read
    per launch)."""
    if "interpreted" not in _triton:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # no Triton (the launch tests' stand-in kernels)
            InterpretedFunction = ()
        _triton["interpreted"] = InterpretedFunction
    return isinstance(kernel, _triton["interpreted"])


def direct_launch_enabled(kernel) -> bool:
    return (_direct["ok"] and os.environ.get("DMA_TRITON_DIRECT_LAUNCH", "1") != "0"
            and not _interpreted(kernel))


def run_kernel(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, reusing the compiled kernel of an earlier launch with
    the same specialisation.

    Options the caller leaves out take DEFAULT_OPTIONS."""
    for option, value in DEFAULT_OPTIONS.items():
        kwargs.setdefault(option, value)
    if direct_launch_enabled(kernel):
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
    site_key = (id(kernel), len(args), tuple(kwargs))
    site = _call_sites.get(site_key)
    if site is None:
        site = _call_sites[site_key] = _CallSite(kernel, len(args), site_key[2])
    if not site.complete:
        return False  # a parameter left to its default: let Triton bind it
    values = [*args, *site.keyword_values(kwargs)]
    types = tuple(map(type, values))
    layout = site.layouts.get(types)
    if layout is None:
        layout = site.layouts[types] = _ArgLayout(site.constexpr, types)
    tensors = layout.tensors(values)
    addresses = tuple(map(_data_ptr, tensors))
    for i, address in zip(layout.tensor_positions, addresses):
        values[i] = address
    device = _current_device()
    # A layout belongs to one call site, which fixes the option names. Misalignments rather
    # than Triton's aligned-or-not: finer, so never a wrong kernel.
    key = (layout, device, site.option_values(kwargs), tuple(map(_dtype_of, tensors)),
           tuple(map(_misalignment, addresses)), _int_spec(layout.ints(values)),
           layout.by_value(values))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **kwargs)
        return True
    _launch_compiled(compiled, tuple(grid) + (1,) * (3 - len(grid)), values, device)
    return True


def _launch_compiled(compiled, grid3: tuple, values: list, device: int) -> None:
    """`compiled[grid3](*values)`, without the launch hooks' metadata when no hook is set
    (Triton builds it, and calls both hooks, on every launch otherwise)."""
    enter, leave = _launch_hooks()
    if getattr(enter, "calls", True) or getattr(leave, "calls", True):
        compiled[grid3](*values)  # someone listens (a profiler): Triton's own path
        return
    stream = _current_stream(device)
    compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *values)


def _launch_hooks():
    """Triton's launch hooks (enter, exit): chains of callables, empty unless a profiler or
    a user registered one."""
    if "knobs" not in _triton:
        from triton import knobs

        _triton["knobs"] = knobs
    runtime = _triton["knobs"].runtime
    return runtime.launch_enter_hook, runtime.launch_exit_hook
