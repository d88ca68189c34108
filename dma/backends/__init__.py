"""Built-in backends, registered in the dispatcher on first use.

Importing this package imports no optional dependency: each backend probes for its packages
with dma.packages.installed (a cached lookup) and imports them only when it runs.
"""

from ..dispatch import register
from .cupy_backend import CupyBackend
from .numba_backend import NumbaBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

for _backend in (TritonBackend(), CupyBackend(), NumbaBackend(), TorchBackend()):
    register(_backend)
