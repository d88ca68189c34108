"""Run-time tuning of the triton kernels' launch configurations (opt-in).

By default every kernel launches with its configuration in `triton_backend.CONFIGS`, tuned
offline on an H100 with `benchmarks/tune_triton.py`. With DMA_TRITON_AUTOTUNE=1 the first
launch of a kernel for a new tuning key times the alternatives below (one setting varied at
a time around the default, as the offline script does) on the call's own tensors, and every
later launch with that key uses the fastest. The key is the kernel, the padded head dim, the
dtype, the feature flags, the kv group size, and the query length, key length and window
rounded up to powers of two: a new sequence length in the same bucket reuses the choice,
so nothing is re-tuned per length. Choices last for the process.
"""

from __future__ import annotations

import os
from typing import Callable

# Alternatives per kernel, also the offline script's search space. Kernels absent here
# (decoding) always take their default.
SEARCH = {
    "fwd": dict(BLOCK_N=[16, 32, 64], num_warps=[4, 8], num_stages=[3, 5], STACK=[1, 2, 4],
                LAZY_RESCALE=[True, False]),
    "dq": dict(BLOCK_N=[16, 32, 64], num_warps=[4, 8], num_stages=[3, 5], STACK=[1, 2],
               maxnreg=[None]),
    "dkdv_candidates": dict(BLOCK_M=[16, 32, 64], BLOCK_N=[64, 128], num_warps=[4, 8],
                            num_stages=[2, 3, 4], ROWS=[256, 512, 1024]),
    # dense tiles (no window, or explicit masks; dkdv_keys also in deterministic mode)
    "fwd_dense": dict(BLOCK_N=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3, 4],
                      STACK=[2, 4], LAZY_RESCALE=[True, False]),
    "dkdv_keys": dict(BLOCK_M=[16, 32, 64], BLOCK_N=[64, 128], num_warps=[4, 8],
                      num_stages=[2, 3, 4]),
}
TRIAL_REPS = 3  # timed runs per alternative, after one untimed run (which compiles)

_chosen: dict = {}  # tuning key -> configuration


def enabled() -> bool:
    return os.environ.get("DMA_TRITON_AUTOTUNE") == "1"


def length_bucket(n: int) -> int:
    """n rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def tuning_key(kernel: str, problem, flags: dict, d_pad: int) -> tuple:
    return (kernel, d_pad, problem.dtype, tuple(sorted(flags.items())), problem.group_size,
            length_bucket(problem.seqlen_q), length_bucket(problem.seqlen_k),
            length_bucket(problem.window or 0))


def alternatives(kernel: str, default: dict) -> list[dict]:
    """The default first, then each setting of SEARCH that differs from it."""
    found = [dict(default)]
    for name, values in SEARCH.get(kernel, {}).items():
        for value in values:
            if value != default.get(name):
                found.append(dict(default, **{name: value}))
    return found


def _time_ms(trial: Callable[[dict], None], config: dict, device) -> float:
    """Median time of `config` after one untimed run (which compiles, and fails here if the
    configuration does not fit): TRIAL_REPS runs on a GPU, one elsewhere."""
    from ..benchmarking import median_ms

    reps = TRIAL_REPS if device.type == "cuda" else 1
    return median_ms(lambda: trial(config), device, warmup=1, reps=reps)


def choose(kernel: str, key: tuple, default: dict, trial: Callable[[dict], None],
           device) -> dict:
    """The configuration to launch with: `default` unless tuning is on and `kernel` has
    alternatives, else the fastest alternative for `key` (timed once per key). `trial(config)`
    launches the kernel with a configuration; the caller's real launch follows, so it must
    first undo what trials did to outputs that the kernel adds into."""
    if not enabled() or kernel not in SEARCH:
        return default
    if key not in _chosen:
        best, best_ms = default, float("inf")
        for config in alternatives(kernel, default):
            try:
                ms = _time_ms(trial, config, device)
            except Exception:  # noqa: BLE001 - e.g. out of shared memory or registers
                continue
            if ms < best_ms:
                best, best_ms = config, ms
        _chosen[key] = best
    return _chosen[key]
