"""Launch configurations or switches side by side on one DMA shape: ms per call from an idle
device and back to back, the configurations interleaved over rounds (so a slow spell of the
machine, or of its host, hits them alike); with --kernels also each kernel's GPU time.

    python benchmarks/ab_configs.py --mode fwd --seqlen 16384 \\
        '{}' '{"fwd": {"num_warps": 8, "maxnreg": 128}}'
    python benchmarks/ab_configs.py --mode fwd+bwd '{}' '{"dq": {"num_warps": 4}}'
    python benchmarks/ab_configs.py --mode fwd+bwd --seqlen 4096 \\
        '{}' '{"selection": {"SORT_IN_ONE_PROGRAM": 4096}}'
    python benchmarks/ab_configs.py --docs 16 '{}' '{"fwd_dense": {"num_warps": 8}}'

    python benchmarks/ab_configs.py --backend cupy --kernels \\
        '{}' '{"env": {"DMA_CUPY_WGMMA": "0"}}'
    python benchmarks/ab_configs.py --backend cupy --kernels \\
        '{}' '{"env": {"DMA_CUPY_SOURCES": "/tmp/trial/dma/backends/cuda"}}'

`--docs N` times the explicit-mask path instead (N packed documents as an attn_mask, as
bench_masks.py and profile_kernels.py --docs do). `--kernels` also profiles each
configuration's calls (torch.profiler, in rounds that alternate the configurations) and
prints the median GPU time per call of each kernel: the A/B of a kernel change without
the host's noise.

Each configuration is a JSON object {kernel: settings} laid over the defaults of
dma/backends/triton_backend.py (CONFIGS; triton only); its entry "selection" sets
constants of dma/selection.py (the plan's sizes and sort paths) instead, and its entry
"env" environment variables read at each call (DMA_PLAN_GRAPHS, DMA_CUPY_WGMMA, ...;
DMA_CUPY_SOURCES compares kernel sources: a changed copy of dma/backends/cuda/ against the
package's, in one process).
To compare two versions of the code, run the same command in both checkouts, one after the
other, on the same machine: host time per call can drift by 2x within minutes
(docs/performance.md), so short, host-bound calls compare reliably only within one run.
"""

import argparse
import collections
import json
import os
import statistics

import torch

import dma
from dma import selection
from dma.backends import triton_backend
from dma.benchmarking import (
    Shape,
    back_to_back_ms,
    document_ids,
    document_mask,
    kernel_us_per_call,
    make_inputs,
    time_once_ms,
)

# The plan's constants as shipped, which a configuration's "selection" entry may replace.
SELECTION_DEFAULTS = {name: getattr(selection, name) for name in dir(selection)
                      if name.isupper() and isinstance(getattr(selection, name), int)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=json.loads)
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--seqlen-q", type=int, default=None)
    parser.add_argument("--window", type=int, default=2048, help="0 = no window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--docs", type=int, default=0,
                        help="packed documents as an attn_mask instead of key_bias and window")
    parser.add_argument("--backend", choices=["triton", "cupy"], default="triton")
    parser.add_argument("--kernels", action="store_true",
                        help="also profile each configuration's kernels (GPU us per call)")
    args = parser.parse_args()
    window = args.window or None
    shape = Shape(1, args.seqlen, 32, 8, 128, window, torch.bfloat16, seqlen_q=args.seqlen_q)
    q, k, v, kb = make_inputs(shape, "cuda")
    train = args.mode == "fwd+bwd"
    for t in (q, k, v, kb):
        t.requires_grad_(train)
    do = torch.randn_like(q)
    keys_kept = dict(key_bias=kb, window=window)  # what selects the keys
    if args.docs:
        keys_kept = dict(attn_mask=document_mask(document_ids(args.seqlen, args.docs, q.device)))

    def step():
        with torch.set_grad_enabled(train):
            o = dma.attention(q, k, v, **keys_kept, causal=True, backend=args.backend)
            if train:
                for t in (q, k, v, kb):
                    t.grad = None  # a fresh gradient each call, as training steps do
                o.backward(do)
        return o

    # The environment as it was, for every variable some configuration sets.
    env_before = {name: os.environ.get(name)
                  for config in args.configs for name in config.get("env", {})}

    def use(config):
        config = dict(config)
        plan = config.pop("selection", {})
        unknown = sorted(set(plan) - SELECTION_DEFAULTS.keys())
        if unknown:
            raise SystemExit(f"not a dma.selection constant: {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(SELECTION_DEFAULTS))})")
        for name, value in SELECTION_DEFAULTS.items():
            setattr(selection, name, plan.get(name, value))
        env = {**env_before, **config.pop("env", {})}
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        if config and args.backend != "triton":
            raise SystemExit(f"kernel settings {sorted(config)} apply to the triton backend "
                             "only")
        triton_backend.OVERRIDES.clear()
        triton_backend.OVERRIDES.update(config)

    device = torch.device("cuda")
    calls = 3 if args.seqlen >= 65536 else 10
    reference = None
    for config in args.configs:  # compiles each, and checks that they agree
        use(config)
        o = step().detach().float()
        reference = o if reference is None else reference
        print(f"{json.dumps(config):70} max |o - first| {float((o - reference).abs().max()):.2e}")
    idle = [[] for _ in args.configs]
    times = [[] for _ in args.configs]
    for _ in range(args.rounds):
        for i, config in enumerate(args.configs):
            use(config)
            step()
            torch.cuda.synchronize()
            idle[i].append(statistics.median(time_once_ms(step, device) for _ in range(calls)))
            times[i].append(back_to_back_ms(step, device, calls))
    kernel_us = kernel_times(args.configs, use, step, calls, args.rounds) if args.kernels \
        else None
    use({})
    print(f"device: {torch.cuda.get_device_name()}  shape: {shape.label}  mode: {args.mode}  "
          f"backend: {args.backend}")
    print(f"{'configuration':70} {'from idle':>10} {'b2b median':>11} {'b2b min':>8}")
    for config, from_idle, ms in zip(args.configs, idle, times):
        print(f"{json.dumps(config):70} {statistics.median(from_idle):10.3f} "
              f"{statistics.median(ms):11.3f} {min(ms):8.3f}")
    if kernel_us is not None:
        print("GPU us per call by kernel (median over rounds):")
        for config, per_kernel in zip(args.configs, kernel_us):
            print(f"{json.dumps(config):70} " + ", ".join(
                f"{name} {us:.1f}" for name, us in sorted(per_kernel.items())))


def kernel_times(configs, use, step, calls: int, rounds: int) -> list:
    """Per configuration, {kernel name: median over rounds of its GPU us per call}, each
    round profiling `calls` steps of every configuration in turn."""
    samples = [collections.defaultdict(list) for _ in configs]
    for _ in range(rounds):
        for i, config in enumerate(configs):
            use(config)
            for name, us in kernel_us_per_call(step, calls).items():
                samples[i][name].append(us)
    return [{name: statistics.median(values) for name, values in per_config.items()}
            for per_config in samples]


if __name__ == "__main__":
    main()
