"""Host time per eager dma.attention call (GPU), and where it goes (cProfile).

    python benchmarks/host_time.py                      # decoding 1 x 131072 and a 4k forward
    python benchmarks/host_time.py --cases 16384 --top 30
    python benchmarks/host_time.py --launches --top 0   # host us of each launch, by kernel

Each case runs `--calls` forward calls without synchronising: the host time per call is how
long the loop takes to issue them, the wall time includes the GPU finishing. A call whose
host time exceeds its GPU time is host-bound (the decoding and short-sequence rows of the
benchmark are). Then the same calls under cProfile, functions by own time.

`--stages` times the call's stages (validation, backend choice, plan and its parts, the
forward launch and its parts, allocations), each inclusive of what it calls, in us per call.

`--launches` times, per Triton kernel of the call, the host time of one launch through
`run_kernel` (all of it, then its two parts: finding the compiled kernel, and the compiled
launcher alone), each launch repeated in a loop on the arguments one call gave it.

`--idle` compares a call issued to an idle device (after a synchronize and a 2 ms pause, as
a single call or a benchmark's `time_once_ms` meets it) with the same call in a loop: host
us and device us (CUDA events) per call, for the dma call and for a few bare torch
launches, which show what any call pays from idle whatever its own work.
"""

import argparse
import contextlib
import cProfile
import importlib
import pstats
import statistics
import sys
import time

import torch

import dma
from dma import triton_launch
from dma.benchmarking import Shape, host_and_wall_ms, make_inputs


@contextlib.contextmanager
def replaced(owner, attr: str, replacement):
    """owner.attr replaced by `replacement` while in the block, both in `owner` and in every
    dma module that imported the same function by name; yields the original."""
    original = getattr(owner, attr)
    holders = [owner] + [m for name, m in list(sys.modules.items())
                         if name.startswith("dma") and m is not owner
                         and getattr(m, attr, None) is original]
    for holder in holders:
        setattr(holder, attr, replacement)
    try:
        yield original
    finally:
        for holder in holders:
            setattr(holder, attr, original)


def captured_launches(step) -> list:
    """(kernel, grid, args, kwargs) of every `run_kernel` launch of one `step()`."""
    launches = []
    real = triton_launch.run_kernel

    def recording(kernel, grid, *args, **kwargs):
        launches.append((kernel, grid, args, kwargs))
        real(kernel, grid, *args, **kwargs)

    with replaced(triton_launch, "run_kernel", recording):
        step()
    return launches


STAGES = (
    "dma.validation.validate",
    "dma.dispatch.choose",
    "dma.autograd.make_plan",
    "dma.selection.key_selection_scores",
    "dma.selection._single_row_plan_triton",
    "dma.selection._key_intervals_triton",
    "dma.selection._candidate_lists_triton",
    "dma.backends.triton_backend.TritonBackend.forward",
    "dma.backends.gpu_launch.LaunchArgs.__init__",
    "dma.backends.triton_backend._launch_forward",
    "dma.triton_launch.run_kernel",
    "torch.empty",
    "torch.zeros",
)


def _resolve(dotted: str):
    """(owner, attribute name) of a dotted function or method name."""
    module_name, _, rest = dotted.partition(".")
    owner = importlib.import_module(module_name)
    parts = rest.split(".")
    for i, part in enumerate(parts[:-1]):
        nested = getattr(owner, part, None)
        if nested is None:  # a submodule not imported as an attribute yet
            nested = importlib.import_module(".".join([module_name, *parts[:i + 1]]))
        owner = nested
    return owner, parts[-1]


def stage_times(step, calls: int, stages=STAGES) -> None:
    """Inclusive host us per call of each stage over `calls` calls of `step` (every module
    that imported a stage by name gets the timed stand-in too)."""
    spent = {name: 0.0 for name in stages}
    counts = dict.fromkeys(stages, 0)

    def timed(name, fn):
        def stand_in(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                counts[name] += 1
        return stand_in

    with contextlib.ExitStack() as patches:
        for name in stages:
            owner, attr = _resolve(name)
            patches.enter_context(replaced(owner, attr, timed(name, getattr(owner, attr))))
        for _ in range(calls):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    print(f"{'stage':<52} {'calls':>6} {'us per call':>12}")
    for name in stages:
        print(f"{name:<52} {counts[name] / calls:>6.1f} {1e6 * spent[name] / calls:>12.1f}")


def _us_per_call(fn, calls: int) -> float:
    """Median over 5 loops of `calls` calls, us per call (the GPU queue drained between)."""
    loops = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(loops)


def launch_cost(kernel, grid, args, kwargs, calls: int) -> tuple[float, float, float]:
    """Host us of one launch: through run_kernel, finding the compiled kernel alone
    (run_kernel with the launch itself replaced by a note of what it would run), and the
    compiled launcher alone (nan when run_kernel took Triton's own path)."""
    total = _us_per_call(lambda: triton_launch.run_kernel(kernel, grid, *args, **kwargs),
                         calls)
    found = {}

    def note(compiled, grid3, values, device):
        found.update(compiled=compiled, grid3=grid3, values=values)

    with replaced(triton_launch, "_launch_compiled", note):
        lookup = _us_per_call(lambda: triton_launch._launch_direct(kernel, grid, args, kwargs),
                              calls)
    if "compiled" not in found:
        return total, lookup, float("nan")
    c, grid3, values = found["compiled"], found["grid3"], found["values"]
    stream = torch.cuda.current_stream().cuda_stream
    launcher = _us_per_call(lambda: c.run(*grid3, stream, c.function, c.packed_metadata, None,
                                          None, None, *values), calls)
    return total, lookup, launcher


def launch_costs(step, calls: int = 50) -> None:
    """`launch_cost` of every launch of one `step()`, by kernel."""
    print(f"{'kernel':<34} {'args':>5} {'run_kernel':>11} {'lookup':>8} {'launcher':>9}")
    for kernel, grid, args, kwargs in captured_launches(step):
        kwargs = {**triton_launch.DEFAULT_OPTIONS, **kwargs}  # as run_kernel completes them
        total, lookup, launcher = launch_cost(kernel, grid, args, kwargs, calls)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        print(f"{name:<34} {len(args) + len(kwargs):>5} {total:>11.1f} {lookup:>8.1f} "
              f"{launcher:>9.1f}")


def idle_and_loop_us(step, calls: int = 40, pause_s: float = 0.002) -> tuple:
    """(host, device) us of `step()` from an idle device (medians over `calls`), and host us
    per call in a loop."""
    for _ in range(5):
        step()
    host, device = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        time.sleep(pause_s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        host.append(1e6 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        device.append(1e3 * start.elapsed_time(end))
    loop = _us_per_call(step, calls)
    return statistics.median(host), statistics.median(device), loop


def idle_costs(step) -> None:
    """`idle_and_loop_us` of `step` and of 1, 2, 4 and 8 bare torch launches."""
    x = torch.zeros(1 << 16, device="cuda")

    def launches(n):
        return lambda: [x.add_(1.0) for _ in range(n)]

    print(f"{'from an idle device':<24} {'host us':>8} {'device us':>10} {'host us in a loop':>18}")
    for label, fn in [("this call", step)] + [(f"{n} torch launches", launches(n))
                                               for n in (1, 2, 4, 8)]:
        host, device, loop = idle_and_loop_us(fn)
        print(f"{label:<24} {host:>8.1f} {device:>10.1f} {loop:>18.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1x131072", "4096"],
                        help="query rows x keys, or tokens for both")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--top", type=int, default=20, help="functions listed (0: none)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--stages", action="store_true",
                        help="inclusive host us per call of the call's stages")
    parser.add_argument("--launches", action="store_true",
                        help="host us per launch, by kernel (run_kernel and its parts)")
    parser.add_argument("--idle", action="store_true",
                        help="host and device us of a call from an idle device, and in a loop")
    args = parser.parse_args()
    for case in args.cases:
        sq, _, sk = case.partition("x")
        sq, sk = int(sq), int(sk or sq)
        shape = Shape(1, sk, 32, 8, 128, args.window, torch.bfloat16,
                      seqlen_q=None if sq == sk else sq)
        inputs = make_inputs(shape, "cuda")

        def step(q=inputs[0], k=inputs[1], v=inputs[2], kb=inputs[3]):
            with torch.no_grad():
                dma.attention(q, k, v, key_bias=kb, window=args.window, causal=True,
                              backend=args.backend)

        host, wall = host_and_wall_ms(step, args.calls)
        print(f"{shape.label}: host {host:.3f} ms per call, wall {wall:.3f} ms per call")
        if args.stages:
            stage_times(step, args.calls)
        if args.launches:
            launch_costs(step)
        if args.idle:
            idle_costs(step)
        if args.top:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
