"""Which calls go through the shared autograd function: only those that need a gradient.
Inference calls take the forward directly (no autograd bookkeeping, no plan kept) and give
the same result bit for bit."""

import pytest
import torch

import dma
from dma import autograd
from harness import available_devices


@pytest.fixture
def autograd_calls(monkeypatch):
    """The number of calls that went through AttentionFunction.apply."""
    calls = []
    original = autograd.AttentionFunction.apply

    def counting_apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(autograd.AttentionFunction, "apply", counting_apply)
    return calls


def inputs(requires_grad: bool):
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 40, 4, 16, generator=generator) for _ in range(3))
    key_bias = torch.randn(2, 4, 40, generator=generator)
    for t in (q, k, v, key_bias):
        t.requires_grad_(requires_grad)
    return q, k, v, key_bias


def attend(q, k, v, key_bias):
    return dma.attention(q, k, v, key_bias=key_bias, window=9, causal=True, backend="torch",
                         return_lse=True)


def test_gradient_calls_go_through_autograd(autograd_calls):
    q, k, v, key_bias = inputs(requires_grad=True)
    o, lse = attend(q, k, v, key_bias)
    assert len(autograd_calls) == 1
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, key_bias))


@pytest.mark.parametrize("case", ["no_grad_inputs", "under_no_grad", "under_inference_mode"])
def test_inference_calls_skip_autograd_with_the_same_result(autograd_calls, case):
    expected_o, expected_lse = (t.detach() for t in attend(*inputs(requires_grad=True)))
    autograd_calls.clear()
    if case == "no_grad_inputs":
        o, lse = attend(*inputs(requires_grad=False))
    elif case == "under_no_grad":
        with torch.no_grad():
            o, lse = attend(*inputs(requires_grad=True))
    else:
        with torch.inference_mode():
            o, lse = attend(*inputs(requires_grad=True))
    assert autograd_calls == []
    assert o.grad_fn is None and not o.requires_grad
    assert torch.equal(o, expected_o) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize("used", ["o", "lse"])
def test_an_unused_output_gets_the_gradient_of_zeros(used, monkeypatch):
    # The backward receives None for an output the loss leaves out (no tensor of zeros is
    # made for it); the gradients must be those of a loss that weighs it by zero.
    received = []
    original = autograd.backward_impl

    def recording_backward(problem, inputs, backend, plan, o, lse, do, dlse):
        received.append((do is None, dlse is None))
        return original(problem, inputs, backend, plan, o, lse, do, dlse)

    monkeypatch.setattr(autograd, "backward_impl", recording_backward)
    q, k, v, key_bias = inputs(requires_grad=True)
    leaves = (q, k, v, key_bias)
    o, lse = attend(q, k, v, key_bias)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    one_output = (o * weights).sum() if used == "o" else lse.sum()
    got = torch.autograd.grad(one_output, leaves)
    assert received == [(used == "lse", used == "o")]
    o, lse = attend(q, k, v, key_bias)
    zero = torch.zeros((), dtype=o.dtype)
    both = ((o * weights).sum() + lse.sum() * zero if used == "o"
            else (o * zero).sum() + lse.sum())
    expected = torch.autograd.grad(both, leaves)
    for name, g, e in zip("q k v key_bias".split(), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        # lse does not depend on v
        assert (g.abs().sum() > 0) == (used == "o" or name != "v")


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(dma.backends()))
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant, backend, device,
                                                            monkeypatch):
    """torch.utils.checkpoint recomputes the forward in backward and unpacks each saved
    tensor once (the non-reentrant mode fails on a second ctx.saved_tensors)."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("DMA_DETERMINISTIC", "1")  # so that both routes agree bit for bit
    dtype = torch.float32
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 70, 4, 16, generator=g).to(device, dtype)
    k, v = (torch.randn(1, 70, 2, 16, generator=g).to(device, dtype) for _ in range(2))
    key_bias = torch.randn(1, 2, 70, generator=g).to(device, dtype)
    if dma.explain(q, k, v, key_bias=key_bias, window=9, causal=True)[backend]:
        pytest.skip(f"{backend} cannot serve this here")

    def layer(q, k, v, key_bias):
        return dma.attention(q, k, v, key_bias=key_bias, window=9, causal=True,
                             backend=backend)

    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, key_bias)]
        o = (checkpoint(layer, *leaves, use_reentrant=reentrant) if checkpointed
             else layer(*leaves))
        o.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("backend", list(dma.backends()))
def test_second_order_gradients_raise_a_clear_error(backend, device):
    """create_graph=True (as gradient penalties ask) gives the usual first-order gradients;
    differentiating them again says it is not supported, rather than a wrong zero."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 30, 2, 16, generator=g).to(device).requires_grad_()
    k = torch.randn(1, 30, 2, 16, generator=g).to(device)
    if dma.explain(q, k, k, causal=True)[backend]:
        pytest.skip(f"{backend} cannot serve this here")
    for wanted in ([q], [q, k.requires_grad_()]):  # one gradient alone, and several
        first = torch.autograd.grad(
            dma.attention(q, k, k, causal=True, backend=backend).sum(), wanted)
        again = torch.autograd.grad(
            dma.attention(q, k, k, causal=True, backend=backend).sum(), wanted,
            create_graph=True)
        for plain, with_graph in zip(first, again):
            assert torch.equal(plain, with_graph) and with_graph.requires_grad
            with pytest.raises(RuntimeError, match="no second derivative"):
                with_graph.square().sum().backward()
