"""Which calls go through the shared autograd function: only those that need a gradient.
Inference calls take the forward directly (no autograd bookkeeping, no plan kept) and give
the same result bit for bit."""

import pytest
import torch

import dma
from dma import autograd


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
