"""Backends whose kernels have not landed yet.

They are registered so that `python -m dma info`, `dma.explain` and forced-backend errors name
them with the real reasons they cannot run here, including the missing kernels. Each one is
replaced by its own module when its kernels land (see docs/backends.md).
"""

from __future__ import annotations

from ..validation import SUPPORTED_DTYPES
from .base import Backend, Capabilities, missing_packages


def cuda_reasons() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA device is available"]
    return []


class _PendingBackend(Backend):
    packages: tuple = ()
    needs_cuda = False

    def environment_reasons(self) -> list[str]:
        reasons = missing_packages(*self.packages)
        if self.needs_cuda:
            reasons += cuda_reasons()
        reasons.append(f"the {self.name} kernels are not part of this release yet")
        return reasons


class CupyBackend(_PendingBackend):
    name = "cupy"
    packages = ("cupy",)
    needs_cuda = True
    capabilities = Capabilities(devices=frozenset({"cuda"}),
                                dtypes=frozenset(SUPPORTED_DTYPES[:3]), max_head_dim=256)
