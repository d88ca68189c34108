"""dma.attention inside a captured CUDA graph (how serving stacks run their decoding steps):
the plan and the kernels take no host sync and allocate from the graph's pool, so replaying
the graph on new inputs written in place gives exactly what an eager call gives."""

import pytest
import torch

import dma
from dma import tile_lists
from dma.benchmarking import capture_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def bf16_randn(g, *shape):
    return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)


def check_replays(replay, out, statics, fresh, call):
    """Twice: new inputs written into the captured ones, the graph replayed, its output
    against an eager call on the same inputs, bit for bit."""
    for _ in range(2):
        for static, new in zip(statics, fresh()):
            static.copy_(new)
        replay()
        torch.testing.assert_close(out, call(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("seqlen_q,seqlen_k,window", [(1, 5000, 700), (3, 5000, 700),
                                                     (512, 512, 100)])
def test_replay_matches_eager(backend, seqlen_q, seqlen_k, window):
    g = torch.Generator(device="cuda").manual_seed(seqlen_q)

    def fresh():
        return (bf16_randn(g, 1, seqlen_q, 4, 64), bf16_randn(g, 1, seqlen_k, 2, 64),
                bf16_randn(g, 1, seqlen_k, 2, 64), bf16_randn(g, 1, 2, seqlen_k))

    q, k, v, kb = fresh()
    reasons = dma.explain(q, k, v, key_bias=kb, window=window, causal=True)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))

    def call():
        return dma.attention(q, k, v, key_bias=kb, window=window, causal=True, backend=backend)

    replay, out = capture_graph(call)
    check_replays(replay, out, (q, k, v, kb), fresh, call)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_replay_with_an_explicit_mask(backend):
    # The tile lists' size-only bounds are cached across calls (dma.tile_lists), but not
    # while a graph is captured: tensors made then hold nothing until the graph replays.
    g = torch.Generator(device="cuda").manual_seed(7)
    seqlen = 700

    def fresh():
        doc = torch.randint(0, 3, (seqlen,), generator=g, device="cuda").sort().values
        return (bf16_randn(g, 1, seqlen, 4, 64), bf16_randn(g, 1, seqlen, 2, 64),
                bf16_randn(g, 1, seqlen, 2, 64), (doc[:, None] == doc[None, :])[None, None])

    q, k, v, mask = fresh()
    reasons = dma.explain(q, k, v, attn_mask=mask, causal=True)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))

    def call():
        return dma.attention(q, k, v, attn_mask=mask, causal=True, backend=backend)

    def call_uncached():
        tile_lists._tile_bounds.cache_clear()
        return call()

    expected = call()
    replay, out = capture_graph(call_uncached)
    assert tile_lists._tile_bounds.cache_info().currsize == 0  # nothing kept from the capture
    torch.testing.assert_close(call(), expected, rtol=0, atol=0)
    check_replays(replay, out, (q, k, v, mask), fresh, call)
