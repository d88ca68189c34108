"""Backend registry and choice.

Precedence, strongest first: the `backend=` argument, `dma.use_backend(name)`, the
`DMA_BACKEND` environment variable, then the automatic order for the device (CUDA:
triton > cupy > torch; CPU: numba > torch). A backend that is asked for by name and cannot
serve raises `BackendUnavailableError` listing every reason; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

from .backends.base import Backend
from .validation import Problem

ENV_VAR = "DMA_BACKEND"
AUTO_ORDER = {"cuda": ("triton", "cupy", "torch"), "cpu": ("numba", "torch")}

_registry: dict[str, Backend] = {}
_override = threading.local()


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every backend) cannot serve this call; the message says why."""


def register(backend: Backend) -> Backend:
    _registry[backend.name] = backend
    return backend


_builtins_registered = False


def _known() -> dict[str, Backend]:
    """The registry itself, with the built-in backends registered (imported once, on first
    use, rather than an import statement on every call)."""
    global _builtins_registered
    if not _builtins_registered:
        from . import backends as _  # noqa: F401  (registers the built-in backends)

        _builtins_registered = True
    return _registry


def backends() -> dict[str, Backend]:
    return dict(_known())


def get_backend(name: str) -> Backend:
    known = _known()
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(known)}")
    return known[name]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block (thread-local; nests)."""
    get_backend(name)  # unknown names fail here, at the `with`
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def requested_backend(argument: Optional[str]) -> tuple[Optional[str], str]:
    """The forced backend name (or None) and where the request came from."""
    if argument is not None:
        return argument, "backend= argument"
    name = getattr(_override, "name", None)
    if name is not None:
        return name, "dma.use_backend()"
    name = os.environ.get(ENV_VAR, "").strip()
    if name:
        return name, f"{ENV_VAR} environment variable"
    return None, "automatic choice"


def explain(problem: Optional[Problem]) -> dict[str, list[str]]:
    """Per backend, every reason it cannot serve `problem` (an empty list means it can)."""
    return {name: b.reasons(problem) for name, b in _known().items()}


def choose(problem: Problem, argument: Optional[str] = None) -> Backend:
    name, source = requested_backend(argument)
    if name is not None:
        backend = get_backend(name)
        reasons = backend.reasons(problem)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} (forced by {source}) cannot serve this call:\n  - "
                + "\n  - ".join(reasons)
            )
        return backend
    order = AUTO_ORDER.get(problem.device.type, ("torch",))
    every = []
    for candidate in order:
        backend = _known()[candidate]
        reasons = backend.reasons(problem)
        if not reasons:
            return backend
        every.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendUnavailableError(
        "no backend can serve this call:\n  - " + "\n  - ".join(every)
    )
