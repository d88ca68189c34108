"""CUDA graphs of the selection plan: one launch where the eager plan takes five or so.

At 16k tokens the plan's kernels take about a tenth of a forward's GPU time, but issuing
them (launches, allocations, Python) takes a few hundred microseconds of host time, and a
call issued to an idle GPU waits for all of it before the attention kernel starts. A model
calls its layers with the same shapes over and over, so the second time a plan shape is
seen, its kernels are captured into a CUDA graph; from then on a plan is: copy the new
selection scores (and allowed keys) into the graph's inputs, replay, copy the outputs out.

The copy out matters: autograd keeps each call's plan for its backward, and the next
layer's replay would overwrite the graph's outputs. The plan writes all its outputs into one
int32 buffer (views of it), so copying them out is one allocation and one copy; outputs
that are not views of one buffer are packed into one inside the graph.

Not captured (the eager plan runs): CPU tensors; a shape seen once (its first call also
compiles the kernels, which a capture must not do; a decoding cache that grows by a key per
step never repeats a shape); plans that selection.py keeps eager (those that sort through
torch); calls made while the caller captures a graph of its own (the whole call, plan
included, is then in the caller's graph); a shape whose capture failed (it warns once).
`DMA_PLAN_GRAPHS=0` turns graphs off. Graphs are kept per CUDA stream, so calls on
different streams never share inputs.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

MAX_GRAPHS = 4  # plan shapes kept captured (least recently used goes first)
MAX_SEEN = 64  # shapes remembered as seen once


@dataclass
class CapturedPlan:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # the graph's own input tensors (None where the call passes None)
    packed: torch.Tensor  # 1-D int32, holding every output
    layouts: tuple  # each output's (shape, strides, offset) within `packed`, in order


@dataclass
class GraphStats:
    """Counts for tests and benchmarks: how plans were answered since the last reset."""

    captures: int = 0
    replays: int = 0
    failures: int = 0


stats = GraphStats()
_graphs: "OrderedDict[Hashable, CapturedPlan]" = OrderedDict()
_seen: "OrderedDict[Hashable, None]" = OrderedDict()
_uncapturable: set = set()
_lock = threading.Lock()


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DMA_PLAN_GRAPHS", "1") != "0"


def clear() -> None:
    """Drop every captured graph and what was seen (their memory goes back to torch)."""
    with _lock:
        _graphs.clear()
        _seen.clear()
        _uncapturable.clear()
        stats.captures = stats.replays = stats.failures = 0


def replay_or_capture(key: Hashable, inputs: Sequence[Optional[torch.Tensor]],
                      build: Callable[..., tuple]) -> Optional[tuple]:
    """`build(*inputs)`'s int32 outputs, from a CUDA graph of it when `key` (everything
    besides the inputs' values that build depends on) was seen before; None where the
    caller should run `build` eagerly. The outputs are fresh tensors, owned by the caller."""
    if torch.cuda.is_current_stream_capturing():
        return None
    key = (key, torch.cuda.current_stream().cuda_stream)
    with _lock:
        if key in _uncapturable:
            return None
        entry = _graphs.get(key)
        if entry is None:
            if key not in _seen:
                _remember(_seen, key, None, MAX_SEEN)
                return None
            entry = _capture(key, inputs, build)
            if entry is None:
                return None
            _remember(_graphs, key, entry, MAX_GRAPHS)
        else:
            _graphs.move_to_end(key)
        for graph_input, new in zip(entry.inputs, inputs):
            if graph_input is not None:
                graph_input.copy_(new)
        entry.graph.replay()
        stats.replays += 1
        packed = entry.packed.clone()
    return tuple(packed.as_strided(*layout) for layout in entry.layouts)


def _remember(cache: OrderedDict, key, value, limit: int) -> None:
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)


def _graph_inputs(inputs) -> tuple:
    """The graph's own tensors for `inputs` (None stays None). Normal tensors even when the
    capture runs under torch.inference_mode: later calls outside it copy into them, which
    an inference tensor refuses."""
    with torch.inference_mode(False):
        return tuple(
            None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in inputs)


def _capture(key, inputs, build) -> Optional[CapturedPlan]:
    """A graph of `build` on inputs of its own, or None (with a warning, once per key) if
    the capture fails: that key then stays eager."""
    graph_inputs = _graph_inputs(inputs)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = build(*graph_inputs)
            packed, layouts = _packed(outputs)
    except Exception as error:  # noqa: BLE001 - any failure leaves the eager plan in charge
        _uncapturable.add(key)
        stats.failures += 1
        warnings.warn(f"dma: the selection plan could not be captured into a CUDA graph "
                      f"and runs eagerly for this shape ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=3)
        return None
    stats.captures += 1
    return CapturedPlan(graph, graph_inputs, packed, layouts)


def _packed(outputs) -> tuple:
    """(1-D int32 buffer holding every output, each output's layout in it): the buffer the
    outputs are views of, or else a new one they are copied into (inside the capture)."""
    if any(t.dtype != torch.int32 for t in outputs):
        raise TypeError("plan graphs hand out int32 outputs only")
    base = outputs[0]._base
    if base is not None and base.dim() == 1 and all(t._base is base for t in outputs):
        start = base.storage_offset()
        return base, tuple((t.shape, t.stride(), t.storage_offset() - start) for t in outputs)
    packed = torch.cat([t.reshape(-1) for t in outputs])
    layouts, offset = [], 0
    for t in outputs:
        layouts.append((t.shape, torch.empty(t.shape, device="meta").stride(), offset))
        offset += t.numel()
    return packed, tuple(layouts)
