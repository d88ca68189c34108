"""Tensors past 2^31 elements (GPU only): offsets such as batch x batch stride need 64 bits.

q has 3 x 2^30 elements here, so the last batch entry starts at element 2^31: the result for
that entry must equal the same entry computed alone (a batch of one): the forward bit for
bit, dq up to the order of float32 additions (a wrong offset reads other rows entirely).
"""

import pytest
import torch

import dma

BATCH, TOKENS, HEADS, HEAD_DIM, WINDOW = 3, 131072, 64, 128, 64
NEEDED_BYTES = 60 * 2**30  # inputs, outputs, gradients and the batch-of-one rerun


def _device_with_room():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    free, _ = torch.cuda.mem_get_info()
    if free < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES >> 30} GiB of free GPU memory")
    return torch.device("cuda")


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_last_batch_entry_past_int32_offsets(backend):
    device = _device_with_room()
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator)

    q = randn(BATCH, TOKENS, HEADS, HEAD_DIM)
    k, v = randn(BATCH, TOKENS, 1, HEAD_DIM), randn(BATCH, TOKENS, 1, HEAD_DIM)
    key_bias = randn(BATCH, 1, TOKENS)
    assert q[-1].data_ptr() - q.data_ptr() >= 2**31 * q.element_size()

    do = randn(BATCH, TOKENS, HEADS, HEAD_DIM)

    def run(entries):
        q_in = q[entries].detach().requires_grad_(True)
        o, lse = dma.attention(q_in, k[entries], v[entries], key_bias=key_bias[entries],
                               window=WINDOW, causal=True, return_lse=True, backend=backend)
        o.backward(do[entries])
        return o.detach(), lse, q_in.grad

    o, lse, dq = run(slice(None))
    last = slice(BATCH - 1, BATCH)
    o_alone, lse_alone, dq_alone = run(last)
    assert torch.isfinite(o[last]).all()
    assert torch.equal(o[last], o_alone)
    assert torch.equal(lse[last], lse_alone)
    torch.testing.assert_close(dq[last], dq_alone, rtol=1e-2, atol=1e-2)
