"""dma.attention inside a captured CUDA graph (how serving stacks run their decoding steps):
the plan and the kernels take no host sync and allocate from the graph's pool, so replaying
the graph on new inputs written in place gives exactly what an eager call gives."""

import pytest
import torch

import dma
from dma.benchmarking import capture_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("seqlen_q,seqlen_k,window", [(1, 5000, 700), (3, 5000, 700),
                                                     (512, 512, 100)])
def test_replay_matches_eager(backend, seqlen_q, seqlen_k, window):
    g = torch.Generator(device="cuda").manual_seed(seqlen_q)

    def fresh():
        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

        return (rand(1, seqlen_q, 4, 64), rand(1, seqlen_k, 2, 64), rand(1, seqlen_k, 2, 64),
                rand(1, 2, seqlen_k))

    q, k, v, kb = fresh()
    reasons = dma.explain(q, k, v, key_bias=kb, window=window, causal=True)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))

    def call():
        return dma.attention(q, k, v, key_bias=kb, window=window, causal=True, backend=backend)

    replay, out = capture_graph(call)
    for _ in range(2):
        for static, new in zip((q, k, v, kb), fresh()):
            static.copy_(new)
        replay()
        torch.testing.assert_close(out, call(), rtol=0, atol=0)
