"""benchmarks/probe_forward.py's calibration kernel agrees with its own reference (so the
times it reports are of a correct attention), for every per-pair extra it prices and for
tiles wider than the query block. Runs under the Triton interpreter without a GPU."""

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from probe_forward import bias_parts, probe, probe_reference, probe_scale  # noqa: E402

SMALL = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("extra", [
    dict(), dict(READ=2), dict(READ=2, KEY_BIAS=1), dict(READ=2, KEY_BIAS=2),
    dict(READ=2, TEST=True), dict(ROW_SUMS_ON_MMA=True), dict(LAZY=True),
    dict(STACK=2, BLOCK_N=64, READ=2, KEY_BIAS=2, TEST=True, LAZY=True),
], ids=lambda extra: "-".join(f"{k}={v}" for k, v in extra.items()) or "plain")
def test_triton_probe_matches_its_reference(extra):
    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    seqlen, window, dim = 192, 64, 32
    q, k, v = (torch.randn(n, seqlen, dim, generator=g).to(device, dtype) for n in (4, 2, 2))
    key_bias = 3 * torch.randn(2, seqlen, generator=g).to(device)
    index = torch.arange(seqlen, dtype=torch.int32, device=device).repeat(2, 1).contiguous()
    first = index.clone()
    config = dict(SMALL, **extra)
    bias_in = key_bias
    if config.get("KEY_BIAS") == 2:
        bias_in = bias_parts(key_bias, probe_scale(dim)).to(dtype)
    got = probe(q, k, v, window, config, index, bias_in, first).float()
    want = probe_reference(q, k, v, window, config["BLOCK_M"],
                           key_bias if config.get("KEY_BIAS") else None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               rtol=0)
