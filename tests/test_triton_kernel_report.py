"""The triton kernels compiled for Hopper without a GPU (benchmarks/kernel_report.py): every
tile product of the dk/dv kernels is a warpgroup MMA (their tiles are key-major; with
32-row (rows, keys) tiles two of the four fell back to the older mma.sync), and so are the
forward's two products in both of its key loops (fully kept tiles, then tested ones); and
no kernel divides integers in its per-tile loops."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def report(*kernels):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"),
                          "--kernels", *kernels], capture_output=True, text=True, env=env,
                         check=True)
    rows = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in kernels:
            # kernel, shared, KiB, regs, spill, wgmma, mma, async, sync, div, waits
            rows[fields[0]] = dict(wgmma=int(fields[5]), mma=int(fields[6]),
                                   div=int(fields[9]))
    return rows


def test_triton_dkdv_kernels_use_warpgroup_mma_on_hopper():
    rows = report("dkdv_candidates", "dkdv_keys", "fwd")
    assert rows["dkdv_candidates"] == dict(wgmma=4, mma=0, div=0)
    assert rows["dkdv_keys"] == dict(wgmma=4, mma=0, div=0)
    # two key loops (fully kept tiles, then the rest), each with q k^T, p v and p times ones
    # (the row sums)
    assert rows["fwd"] == dict(wgmma=6, mma=0, div=0)


def test_triton_tile_loops_divide_no_integers():
    # A division in a per-tile loop is not hoisted out of it: the dense forward divided its
    # head by key_bias's head divisor in every tile (35 SASS instructions of 719) until each
    # kernel took its shared-head indices once, before its loops.
    rows = report("fwd_dense", "fwd_decode", "dq")
    assert {kernel: row["div"] for kernel, row in rows.items()} == dict(
        fwd_dense=0, fwd_decode=0, dq=0)
