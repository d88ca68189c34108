"""Selection plans replayed from CUDA graphs (dma/plan_graphs.py) against eager plans."""

from collections import OrderedDict

import pytest
import torch
from test_selection import _assert_same_plans

from dma import plan_graphs
from dma.selection import build_interval_plan, plan_tensors
from dma.validation import validate


def test_graphs_only_on_cuda_and_only_when_enabled(monkeypatch):
    monkeypatch.delenv("DMA_PLAN_GRAPHS", raising=False)
    assert not plan_graphs.graphs_enabled(torch.device("cpu"))
    assert plan_graphs.graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv("DMA_PLAN_GRAPHS", "0")
    assert not plan_graphs.graphs_enabled(torch.device("cuda"))


def test_caches_drop_the_least_recently_used():
    cache = OrderedDict()
    for key in range(5):
        plan_graphs._remember(cache, key, str(key), limit=3)
    cache.move_to_end(2)
    plan_graphs._remember(cache, 5, "5", limit=3)
    assert list(cache) == [4, 2, 5]


def test_outputs_of_one_buffer_are_handed_out_without_packing():
    buffer = torch.arange(40, dtype=torch.int32)
    a, b, c = buffer.split([10, 6, 24])
    outputs = (a.view(2, 5), b, c.view(2, 3, 4)[:, 1], c.view(2, 3, 4)[:, 2])
    packed, layouts = plan_graphs._packed(outputs)
    assert packed is buffer
    copy = packed.clone()
    for t, layout in zip(outputs, layouts):
        assert torch.equal(copy.as_strided(*layout), t)


def test_separate_outputs_are_packed():
    counts = torch.arange(12, dtype=torch.int32).view(2, 2, 3)
    outputs = (torch.arange(7, dtype=torch.int32), counts[:, 0], counts[:, 1], counts[:, 1])
    packed, layouts = plan_graphs._packed(outputs)
    assert packed.numel() == 7 + 3 * 6
    for t, layout in zip(outputs, layouts):
        assert torch.equal(packed.as_strided(*layout), t)
    with pytest.raises(TypeError):
        plan_graphs._packed((torch.zeros(3),))


def test_triton_plans_write_their_outputs_into_one_buffer():
    """So that a replayed plan is handed out with one copy (plan_graphs._packed)."""
    from test_selection import _plan_kernel_device

    device = _plan_kernel_device()
    for sq in (1, 100):
        problem, inputs = _problem(device, sq, 300, 40, True, True, seed=sq)
        scores = inputs.key_bias.detach().reshape(4, 300).contiguous()
        allowed = inputs.key_padding_mask[:, None].expand(2, 2, 300).reshape(4, 300)
        outputs = plan_tensors(problem, scores, allowed.contiguous(), 32, "triton", True)
        base = outputs[0]._base
        assert base is not None and all(t._base is base for t in outputs)


def test_graph_inputs_take_copies_outside_inference_mode():
    """A plan shape captured under torch.inference_mode is replayed by later calls outside
    it, which copy their scores into the graph's inputs."""
    scores = torch.randn(4, 10)
    with torch.inference_mode():
        inference_scores = torch.randn(4, 10)
        graph_inputs = plan_graphs._graph_inputs((inference_scores, None))
    assert graph_inputs[1] is None and not graph_inputs[0].is_inference()
    graph_inputs[0].copy_(scores)
    assert torch.equal(graph_inputs[0], scores)


def test_cpu_plans_stay_eager(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a CPU plan asked for a CUDA graph")

    monkeypatch.setattr(plan_graphs, "replay_or_capture", fail)
    problem, inputs = _problem("cpu", 64, 64, 16, True, False, 0)
    for _ in range(3):
        build_interval_plan(problem, inputs, 16, engine="torch")


def _problem(device, sq, sk, window, causal, padded, seed, dtype=torch.float32):
    """A DMA problem on fresh random inputs: 2 batches, 4 query heads over 2 kv heads."""
    g = torch.Generator().manual_seed(seed)
    if seed % 2:
        key_bias = torch.randint(0, 5, (2, 2, sk), generator=g).to(dtype)  # many ties
    else:
        key_bias = torch.randn(2, 2, sk, generator=g).to(dtype)
    q = torch.randn(2, sq, 4, 16, generator=g).to(dtype)
    k = torch.randn(2, sk, 2, 16, generator=g).to(dtype)
    padding = torch.rand(2, sk, generator=g) > 0.3 if padded else None
    if padded:
        padding = padding.to(device)
    q, k, key_bias = q.to(device), k.to(device), key_bias.to(device)
    return validate(q, k, k, key_bias=key_bias, window=window, causal=causal,
                    key_padding_mask=padding)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

# (Sq, Sk, window, causal, key padding, block_m, full_first, key_bias dtype)
CASES = [
    (2048, 2048, 256, True, False, 128, True, torch.bfloat16),  # merged sort, as cupy plans
    (2048, 2048, 256, True, True, 64, False, torch.float32),  # key padding: allowed keys
    (300, 400, 64, True, False, 32, True, torch.float16),  # one-program sort, Sq < Sk
    (500, 500, 100, False, True, 16, True, torch.float32),  # not causal
    (1, 5000, 512, True, False, 128, True, torch.bfloat16),  # decoding
    (1, 5000, 512, True, True, 64, False, torch.float32),  # decoding with padding
]


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=[f"sq{c[0]}-sk{c[1]}-w{c[2]}" for c in CASES])
def test_replayed_plans_match_eager_ones(case, monkeypatch):
    """The second call of a shape captures, later ones replay; every plan equals the eager
    plan of its own inputs, and a replay never changes a plan handed out before."""
    sq, sk, window, causal, padded, block_m, full_first, dtype = case
    pytest.importorskip("triton")
    plan_graphs.clear()
    handed_out = []
    for call in range(5):
        problem, inputs = _problem("cuda", sq, sk, window, causal, padded, seed=call,
                                   dtype=dtype)
        monkeypatch.setenv("DMA_PLAN_GRAPHS", "1")
        plan = build_interval_plan(problem, inputs, block_m, full_first=full_first)
        monkeypatch.setenv("DMA_PLAN_GRAPHS", "0")
        expected = build_interval_plan(problem, inputs, block_m, full_first=full_first)
        _assert_same_plans(expected, plan)
        handed_out.append((expected, plan))
    assert plan_graphs.stats.captures == 1 and plan_graphs.stats.failures == 0
    assert plan_graphs.stats.replays == 4  # calls 2 (right after its capture) to 5
    for expected, plan in handed_out:
        _assert_same_plans(expected, plan)


@needs_cuda
def test_plans_captured_under_inference_mode_replay_outside_it(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("DMA_PLAN_GRAPHS", "1")
    plan_graphs.clear()
    problem, inputs = _problem("cuda", 256, 256, 32, True, True, seed=0)
    with torch.inference_mode():
        for _ in range(2):  # seen, then captured and replayed
            build_interval_plan(problem, inputs, 64, full_first=True)
    assert plan_graphs.stats.captures == 1
    problem, inputs = _problem("cuda", 256, 256, 32, True, True, seed=1)
    plan = build_interval_plan(problem, inputs, 64, full_first=True)
    assert plan_graphs.stats.replays == 2
    monkeypatch.setenv("DMA_PLAN_GRAPHS", "0")
    _assert_same_plans(build_interval_plan(problem, inputs, 64, full_first=True), plan)


@needs_cuda
def test_graphs_are_kept_per_stream():
    pytest.importorskip("triton")
    plan_graphs.clear()
    problem, inputs = _problem("cuda", 256, 256, 32, True, False, seed=0)
    expected = build_interval_plan(problem, inputs, 64, full_first=True)
    build_interval_plan(problem, inputs, 64, full_first=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = build_interval_plan(problem, inputs, 64, full_first=True)  # seen once here
        second = build_interval_plan(problem, inputs, 64, full_first=True)
    torch.cuda.current_stream().wait_stream(side)
    assert plan_graphs.stats.captures == 2
    _assert_same_plans(expected, first)
    _assert_same_plans(expected, second)


@needs_cuda
def test_plans_inside_a_callers_capture_stay_eager():
    """A caller capturing its own graph gets the plan's kernels in that graph."""
    pytest.importorskip("triton")
    plan_graphs.clear()
    problem, inputs = _problem("cuda", 256, 256, 32, True, False, seed=0)
    expected = build_interval_plan(problem, inputs, 64)
    build_interval_plan(problem, inputs, 64)  # the plan's own capture, and a replay
    assert (plan_graphs.stats.captures, plan_graphs.stats.replays) == (1, 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = build_interval_plan(problem, inputs, 64)
    graph.replay()
    torch.cuda.synchronize()
    assert (plan_graphs.stats.captures, plan_graphs.stats.replays) == (1, 1)
    _assert_same_plans(expected, plan)
