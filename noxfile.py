"""Test sessions, one per backend, plus lint.

`nox` runs the default set: everything this machine can run (GPU sessions run their CPU
variants without a GPU: the triton session under the Triton interpreter, the cupy session as
an nvcc compile check). CPU environments pin the CPU build of torch so that pip never pulls a
multi-GB CUDA build; set DMA_TORCH_SPEC to install another torch.
"""

import os
import shutil

import nox

nox.options.sessions = ["lint", "torch", "numba", "triton", "cupy"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("DMA_TORCH_SPEC", "torch==2.13.0")
HAS_GPU = shutil.which("nvidia-smi") is not None


def install(session, extras):
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "dma", "tests", "benchmarks", "noxfile.py")


@nox.session
def torch(session):
    """The whole suite (validation, dispatch, selection, memory) on the torch backend."""
    install(session, "test")
    session.run("pytest", "-q", "-k", "not conformance or torch", *session.posargs)


@nox.session
def numba(session):
    install(session, "test,numba")
    session.run("pytest", "-q", "tests/conformance", "tests/test_nn.py", "tests/test_selection.py",
                "tests/test_numba_tiles.py", "tests/test_autocast.py",
                "tests/test_batch_chunks.py", "tests/test_infinite_scores.py",
                "tests/test_autograd_route.py", "-k", "numba",
                *session.posargs)


@nox.session
def triton(session):
    """On a GPU: the conformance suite for triton. Without one: the interpreter subset."""
    install(session, "test,triton")
    env = {} if HAS_GPU else {"TRITON_INTERPRET": "1"}
    # The interpreter runs on the CPU: one test process per core (most of CI's time).
    workers = [] if HAS_GPU else ["-n", "auto"]
    session.run("pytest", "-q", *workers, "tests/conformance", "tests/test_gpu_modes.py",
                "tests/test_selection.py", "tests/test_nn.py", "tests/test_triton_fitting.py",
                "tests/test_triton_kernel_report.py", "tests/test_triton_probe.py",
                "tests/test_row_delta.py", "tests/test_plan_graphs.py", "tests/test_autocast.py",
                "tests/test_devices.py", "tests/test_batch_chunks.py",
                "tests/test_infinite_scores.py", "tests/test_autograd_route.py", "-k", "triton",
                *session.posargs,
                env=env)


@nox.session
def cupy(session):
    """On a GPU: the conformance suite for cupy (and on compute capability 9.0 its cases again
    through the warpgroup kernels). Without one: every kernel source compiled with nvcc for
    sm_80 and sm_90 (the warpgroup kernels for sm_90a), and the launcher's host-side checks."""
    install(session, "test")
    if HAS_GPU:
        session.install(".[cupy13]")
    session.run("pytest", "-q", "tests/conformance", "tests/test_cupy_build.py",
                "tests/test_cupy_wgmma.py", "tests/test_gpu_modes.py", "tests/test_nn.py",
                "tests/test_row_delta.py", "tests/test_autocast.py", "tests/test_devices.py",
                "tests/test_batch_chunks.py", "tests/test_infinite_scores.py",
                "tests/test_autograd_route.py", "-k", "cupy or warpgroup",
                *session.posargs)
