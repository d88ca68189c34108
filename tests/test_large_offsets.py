"""Tensors past 2^31 elements (GPU only): offsets such as batch x batch stride or head x head
stride need 64 bits.

q holds more than 2^31 elements, and the entry checked (the last batch entry of a (B, S, H, D)
tensor, or the last head of a (B, H, S, D) tensor passed transposed) starts past element 2^31.
Its result must equal the same entry computed alone: the forward bit for bit, dq up to the
order of float32 additions (a wrong offset reads other rows entirely).
"""

import pytest
import torch

import dma

TOKENS, HEAD_DIM, WINDOW = 131072, 128, 64
LAYOUTS = {  # (batch, heads, q stored as (B, H, S, D) and passed transposed)
    "batch": (3, 64, False),
    "heads": (1, 160, True),
}
NEEDED_BYTES = 60 * 2**30  # inputs, outputs, gradients and the rerun of the entry alone


def _device_with_room():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    free, _ = torch.cuda.mem_get_info()
    if free < NEEDED_BYTES:
        pytest.skip(f"needs {NEEDED_BYTES >> 30} GiB of free GPU memory")
    return torch.device("cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_last_entry_past_int32_offsets(backend, layout):
    device = _device_with_room()
    batch, heads, heads_outer = LAYOUTS[layout]
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator)

    def queries():  # (B, S, H, D), possibly a transposed view of (B, H, S, D)
        if heads_outer:
            return randn(batch, heads, TOKENS, HEAD_DIM).transpose(1, 2)
        return randn(batch, TOKENS, heads, HEAD_DIM)

    q, do = queries(), queries()
    k, v = randn(batch, TOKENS, 1, HEAD_DIM), randn(batch, TOKENS, 1, HEAD_DIM)
    key_bias = randn(batch, 1, TOKENS)
    # The entry checked, as indices of q (B, S, H, D), of k, v and key_bias, and of lse
    # (B, H, S): the last batch entry, or the last head of every entry.
    if layout == "batch":
        last_q = last_kv = last_lse = (slice(batch - 1, batch),)
    else:
        last_head = slice(heads - 1, heads)
        last_q = (slice(None), slice(None), last_head)
        last_kv = ()  # every entry: k, v and key_bias serve all heads
        last_lse = (slice(None), last_head)
    assert q[last_q].data_ptr() - q.data_ptr() >= 2**31 * q.element_size()

    def run(q, k, v, key_bias, do):
        q = q.detach().requires_grad_(True)
        o, lse = dma.attention(q, k, v, key_bias=key_bias, window=WINDOW, causal=True,
                               return_lse=True, backend=backend)
        o.backward(do)
        return o.detach(), lse, q.grad

    o, lse, dq = run(q, k, v, key_bias, do)
    o_alone, lse_alone, dq_alone = run(q[last_q], k[last_kv], v[last_kv], key_bias[last_kv],
                                       do[last_q])
    assert torch.isfinite(o[last_q]).all()
    assert torch.equal(o[last_q], o_alone)
    assert torch.equal(lse[last_lse], lse_alone)
    torch.testing.assert_close(dq[last_q], dq_alone, rtol=1e-2, atol=1e-2)
