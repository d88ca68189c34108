"""Optional packages (triton, cupy, numba), looked up without importing them.

A lookup walks sys.path (about 0.1 ms), and the dispatcher and the plan ask on every call, so
each answer is kept for the life of the process: install a package, then start Python.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache


@lru_cache(maxsize=None)
def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
