"""dma: Dynamic Mask Attention for PyTorch (fast, exact, trainable sparse attention)."""

from . import nn
from .api import attention, explain
from .dispatch import BackendUnavailableError, backends, use_backend
from .nn import key_scores

__version__ = "0.1.0"

__all__ = ["attention", "explain", "use_backend", "backends", "BackendUnavailableError",
           "key_scores", "nn"]
