"""The torch backend keeps memory bounded: 64k tokens, window 256, forward and backward."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, time, torch, dma
torch.manual_seed(0)
S, D, W = {seqlen}, 64, 256
q = torch.randn(1, S, 1, D, requires_grad=True)
k = torch.randn(1, S, 1, D, requires_grad=True)
v = torch.randn(1, S, 1, D, requires_grad=True)
kb = torch.randn(1, 1, S, requires_grad=True)
t0 = time.perf_counter()
o = dma.attention(q, k, v, key_bias=kb, window=W, causal=True, backend="torch")
(o.float() * torch.randn_like(o)).sum().backward()
ok = all(torch.isfinite(t).all().item() for t in (o, q.grad, k.grad, v.grad, kb.grad))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
print(json.dumps(dict(peak_mib=peak, seconds=time.perf_counter() - t0, finite=ok)))
"""


@pytest.mark.parametrize("seqlen", [65536])
def test_64k_tokens_under_2gb(seqlen):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(seqlen=seqlen)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["finite"]
    assert result["peak_mib"] < 2048, result
