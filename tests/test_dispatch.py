"""Dispatcher contract: precedence, forced-backend errors, unknown names, explain."""

import pytest
import torch

import dma
from dma import dispatch


def tensors():
    return torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)


def chosen_name(monkeypatch=None, argument=None):
    q, k, v = tensors()
    problem, _ = dma.validation.validate(q, k, v)
    return dispatch.choose(problem, argument).name


def test_every_backend_registered():
    assert set(dma.backends()) == {"triton", "cupy", "numba", "torch"}


def test_auto_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("DMA_BACKEND", raising=False)
    expected = "numba" if not dma.backends()["numba"].reasons(None) else "torch"
    assert chosen_name() == expected


def test_unknown_name_lists_known(monkeypatch):
    monkeypatch.delenv("DMA_BACKEND", raising=False)
    q, k, v = tensors()
    with pytest.raises(ValueError) as info:
        dma.attention(q, k, v, backend="nope")
    for name in ("triton", "cupy", "numba", "torch"):
        assert name in str(info.value)
    monkeypatch.setenv("DMA_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dma.attention(q, k, v)
    with pytest.raises(ValueError, match="unknown backend"):
        with dma.use_backend("nope"):
            pass


def test_precedence(monkeypatch):
    monkeypatch.setenv("DMA_BACKEND", "cupy")
    # environment variable alone: cupy is forced and cannot serve a CPU tensor
    with pytest.raises(dma.BackendUnavailableError, match="DMA_BACKEND"):
        chosen_name()
    # the context manager beats the environment variable
    with dma.use_backend("torch"):
        assert chosen_name() == "torch"
        # the argument beats the context manager
        with pytest.raises(dma.BackendUnavailableError, match="backend= argument"):
            chosen_name(argument="triton")
        assert chosen_name(argument="torch") == "torch"
    monkeypatch.setenv("DMA_BACKEND", "torch")
    assert chosen_name() == "torch"


def test_forced_backend_lists_every_reason(monkeypatch):
    monkeypatch.delenv("DMA_BACKEND", raising=False)
    q, k, v = (t.double() for t in tensors())
    with pytest.raises(dma.BackendUnavailableError) as info:
        dma.attention(q, k, v, backend="triton")
    message = str(info.value)
    assert "device cpu not supported" in message
    assert "dtype float64 not supported" in message
    assert message.count("\n  - ") >= 2


def test_explain(monkeypatch):
    q, k, v = tensors()
    report = dma.explain(q, k, v, causal=True, window=4, backend="ignored")
    assert set(report) == {"triton", "cupy", "numba", "torch"}
    assert report["torch"] == []
    assert any("device cpu" in r for r in report["triton"])
    with pytest.raises(ValueError, match="window"):
        dma.explain(q, k, v, window=0)


def test_no_optional_import_at_probe():
    import subprocess
    import sys

    code = ("import sys, torch, dma; dma.explain(*[torch.randn(1, 4, 1, 8)] * 3); "
            "import dma.__main__; "
            "print([m for m in ('cupy', 'numba', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
