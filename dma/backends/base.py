"""What every backend declares and implements.

A backend states its capabilities as data; `reasons` turns them into the full list of reasons
it cannot serve a problem (empty when it can). The dispatcher and `dma.explain` only ever call
`reasons`, so every refusal is explained the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..packages import installed
from ..validation import SELECT_INTERVAL, SELECT_NONE, SELECT_ROWWISE, Inputs, Problem


def missing_packages(*names: str) -> list[str]:
    """Reasons for optional packages that are not installed (nothing is imported)."""
    return [f"package '{n}' is not installed (pip install 'dma-attention[{n}]')"
            for n in names if not installed(n)]


# Elements of o (and do) per chunk of Backend.row_delta: 64 MiB per float32 temporary.
ROW_DELTA_CHUNK_ELEMENTS = 1 << 24


def new_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a tensor that a kernel will fill. With DMA_DEBUG_POISON=1 (set by the test
    suite) it starts as NaN, so any element a kernel forgets to write fails the checks."""
    if os.environ.get("DMA_DEBUG_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def deterministic_mode() -> bool:
    """Backward that gives the same bits on every run (no float atomics, no per-thread
    partial sums): `torch.use_deterministic_algorithms(True)` or DMA_DETERMINISTIC=1."""
    return (torch.are_deterministic_algorithms_enabled()
            or os.environ.get("DMA_DETERMINISTIC") == "1")


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset  # device types: "cpu", "cuda"
    dtypes: frozenset
    min_head_dim: int = 1
    max_head_dim: Optional[int] = None
    selections: frozenset = frozenset({SELECT_NONE, SELECT_INTERVAL, SELECT_ROWWISE})
    softcap: bool = True
    attn_bias: bool = True
    attn_mask: bool = True
    backward: bool = True
    torch_compile: bool = True  # traceable through dma's custom ops (dma/compiled.py)
    notes: tuple = field(default_factory=tuple)  # free text shown by `python -m dma info`


class Backend:
    name: str = ""
    capabilities: Capabilities
    # Rows per query block of the selection plan this backend consumes.
    block_m: int = 64
    # Whether its kernels want each block's fully kept candidates listed first (their tiles
    # then skip the per-pair test; IntervalPlan.full_count) rather than all keys ascending.
    full_first: bool = False

    def environment_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing package, no GPU).

        Must not import optional packages eagerly: use missing_packages.
        """
        return []

    def problem_reasons(self, problem: Problem) -> list[str]:
        """Extra, backend-specific reasons beyond the declared capabilities."""
        return []

    def reasons(self, problem: Optional[Problem]) -> list[str]:
        reasons = list(self.environment_reasons())
        if problem is None:
            return reasons
        cap = self.capabilities
        if problem.device.type not in cap.devices:
            reasons.append(
                f"device {problem.device.type} not supported (supports {sorted(cap.devices)})"
            )
        if problem.dtype not in cap.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in cap.dtypes)
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported "
                           f"(supports {', '.join(names)})")
        if problem.head_dim < cap.min_head_dim or (
            cap.max_head_dim is not None and problem.head_dim > cap.max_head_dim
        ):
            reasons.append(f"head dim {problem.head_dim} outside {cap.min_head_dim}.."
                           f"{cap.max_head_dim}")
        if problem.selection not in cap.selections:
            reasons.append(f"selection '{problem.selection}' (window with this bias/mask "
                           f"layout) not supported")
        if problem.softcap is not None and not cap.softcap:
            reasons.append("softcap not supported")
        if problem.attn_bias is not None and not cap.attn_bias:
            reasons.append("attn_bias not supported")
        if problem.attn_mask is not None and not cap.attn_mask:
            reasons.append("attn_mask not supported")
        if problem.any_grad and not cap.backward:
            reasons.append("backward (inputs require grad) not supported")
        reasons.extend(self.problem_reasons(problem))
        return reasons

    # The two entry points the shared autograd path calls. Tensors arrive validated, in the
    # user's (B, S, H, D) layout, possibly non-contiguous; `plan` is an IntervalPlan for the
    # interval selection and None otherwise.
    def forward(self, problem: Problem, inputs: Inputs, plan):
        """Return (o, lse): o like q, lse float32 (B, H, Sq)."""
        raise NotImplementedError

    def row_delta(self, problem: Problem, o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
        """rowsum(do * o) as (B, H, Sq), float32 (float64 for float64 inputs): the first
        step of every backward. Backends may fuse it into one kernel.

        Runs over chunks of rows: the whole of o and do in float32 (and their product) would
        be the backward's largest temporaries, hundreds of MiB at 16k tokens and 32 heads."""
        acc = torch.float64 if problem.dtype == torch.float64 else torch.float32
        batch, seqlen, heads, dim = o.shape
        delta = new_output((batch, heads, seqlen), acc, o.device)
        rows = max(1, ROW_DELTA_CHUNK_ELEMENTS // max(1, batch * heads * dim))
        for start in range(0, seqlen, rows):
            chunk = slice(start, start + rows)
            product = do[:, chunk].to(acc) * o[:, chunk].to(acc)
            delta[:, :, chunk] = product.sum(-1).transpose(1, 2)
        return delta

    def backward(self, problem: Problem, inputs: Inputs, plan, o, lse, do, delta):
        """Return (dq, dk, dv, d_key_bias, d_attn_bias), each None where not needed.

        `delta` (B, H, Sq), float32 (float64 for float64 inputs), is rowsum(do * o) minus the
        incoming lse gradient, so ds = p * (dp - delta) covers both outputs. Bias gradients
        come back already summed to the bias's own shape.
        """
        raise NotImplementedError

