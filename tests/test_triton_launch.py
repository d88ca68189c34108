"""The direct-launch cache of dma.triton_launch, with a stand-in for a Triton kernel (the
real kernels run through it in the GPU suites; the interpreter takes Triton's own path)."""

import pytest
import torch

from dma import triton_launch


class FakeKernel:
    """Records launches the way a Triton JIT function would take them: `kernel[grid](...)`
    binds (and "compiles"), and its compiled kernel launches with every argument in order."""

    arg_names = ["X", "n", "scale", "BLOCK"]
    constexprs = [3]

    def __init__(self):
        self.bound = []  # launches through kernel[grid]
        self.direct = []  # launches of a compiled kernel

    def __getitem__(self, grid):
        def bind(*args, **kwargs):
            self.bound.append((grid, args, kwargs))
            return FakeCompiled(self)

        return bind


class FakeCompiled:
    """Launches either through `compiled[grid](*values)` (Triton's path, which runs the launch
    hooks) or straight through the launcher `run` (no hooks set)."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, kernel):
        self.kernel = kernel
        self.hooked = 0

    def __getitem__(self, grid3):
        def launch(*values):
            self.hooked += 1
            self.kernel.direct.append((grid3, values))

        return launch

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave,
            *values):
        assert (function, metadata, launch_metadata, enter, leave) == (
            "function", "metadata", None, None, None)
        self.kernel.direct.append(((gx, gy, gz), values))


class FakeHooks:
    def __init__(self):
        self.calls = []


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DMA_TRITON_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_current_stream", lambda device: 0)
    hooks = (FakeHooks(), FakeHooks())  # Triton's are chains like these (no triton needed)
    monkeypatch.setattr(triton_launch, "_launch_hooks", lambda: hooks)
    triton_launch._compiled.clear()
    yield
    triton_launch._compiled.clear()


def test_second_launch_of_a_specialisation_is_direct(direct):
    kernel, x = FakeKernel(), torch.zeros(64)
    triton_launch.run_kernel(kernel, (4, 2), x, 32, 0.5, BLOCK=16, num_warps=4)
    triton_launch.run_kernel(kernel, (5,), x, 48, 0.25, BLOCK=16, num_warps=4)
    assert len(kernel.bound) == 1
    # the tensor travels as its address
    assert kernel.direct == [((5, 1, 1), (x.data_ptr(), 48, 0.25, 16))]


def test_a_launch_hook_gets_tritons_path(direct):
    kernel, x = FakeKernel(), torch.zeros(64)
    triton_launch.run_kernel(kernel, (1,), x, 32, 0.5, BLOCK=16)
    triton_launch._launch_hooks()[0].calls.append(print)  # a profiler listens
    triton_launch.run_kernel(kernel, (1,), x, 32, 0.5, BLOCK=16)
    compiled = next(iter(triton_launch._compiled.values()))
    assert compiled.hooked == 1 and kernel.direct == [((1, 1, 1), (x.data_ptr(), 32, 0.5, 16))]


@pytest.mark.parametrize("change", ["unaligned", "odd_int", "one", "wide_int", "dtype",
                                    "constexpr", "option", "int_for_float", "huge_int"])
def test_a_new_specialisation_goes_through_triton(direct, change):
    kernel, x = FakeKernel(), torch.zeros(64)
    triton_launch.run_kernel(kernel, (1,), x, 32, 0.5, BLOCK=16, num_warps=4)
    args, block, warps = [x, 32, 0.5], 16, 4
    if change == "unaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "odd_int":
        args[1] = 33
    elif change == "one":
        args[1] = 1
    elif change == "wide_int":
        args[1] = 2**40
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        block = 32
    elif change == "int_for_float":
        args[2] = 2  # same position, another type
    elif change == "huge_int":
        args[1] = 2**64 - 16  # past int64: Triton takes it as unsigned
    else:
        warps = 8
    triton_launch.run_kernel(kernel, (1,), *args, BLOCK=block, num_warps=warps)
    assert len(kernel.bound) == 2 and not kernel.direct


def test_switched_off(direct, monkeypatch):
    monkeypatch.setenv("DMA_TRITON_DIRECT_LAUNCH", "0")
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(2):
        triton_launch.run_kernel(kernel, (1,), x, 32, 0.5, BLOCK=16)
    assert len(kernel.bound) == 2 and not kernel.direct


def test_an_interpreted_kernel_takes_tritons_path(direct, monkeypatch):
    """A kernel that Triton decorated for its interpreter is launched through Triton on every
    call, whatever the environment says at launch time (the fixture unset TRITON_INTERPRET)."""
    monkeypatch.setitem(triton_launch._triton, "interpreted", FakeKernel)
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(2):
        triton_launch.run_kernel(kernel, (1,), x, 32, 0.5, BLOCK=16)
    assert len(kernel.bound) == 2 and not kernel.direct
