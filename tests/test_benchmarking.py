"""The benchmark harness on a tiny CPU shape: every contender timed, both timings present,
the baseline's ratio 1."""

import math

import torch

from dma.benchmarking import Shape, format_table, run_benchmark
from harness import benchmark_script


def test_run_benchmark_reports_both_timings():
    shape = Shape(1, 64, 2, 1, 16, 16, torch.float32)
    rows = run_benchmark([shape], "cpu", contenders=("dma-torch", "sdpa"), warmup=1, reps=2,
                         progress=False)
    assert [(r["contender"], r["mode"]) for r in rows] == [
        ("dma-torch", "fwd"), ("sdpa", "fwd"), ("dma-torch", "fwd+bwd"), ("sdpa", "fwd+bwd")]
    for r in rows:
        assert r["ms"] > 0 and r["ms_b2b"] > 0 and not r["note"], r
        assert math.isfinite(r["ratio"])
    assert all(r["ratio"] == 1.0 for r in rows if r["contender"] == "sdpa")
    assert "b2b ms" in format_table(rows, "sdpa")


def test_graph_timing_rows():
    """CUDA-graph timing labels its rows; where it cannot run (no GPU here, or backward) the
    row says why instead of failing the run."""
    shape = Shape(1, 64, 2, 1, 16, 16, torch.float32)
    rows = run_benchmark([shape], "cpu", contenders=("dma-torch", "sdpa"), warmup=1, reps=1,
                         progress=False, cuda_graph=True)
    assert [r["mode"] for r in rows] == ["fwd graph"] * 2 + ["fwd+bwd graph"] * 2
    assert all(r["note"] for r in rows) and all(math.isnan(r["ms"]) for r in rows)
    assert "forward only" in rows[2]["note"]


def test_mask_benchmark_runs_on_cpu(tmp_path):
    bench = benchmark_script("bench_masks")
    rows = bench.main(["--device", "cpu", "--seqlen", "96", "--docs", "3", "--heads", "2",
                       "--kv-heads", "1", "--head-dim", "16", "--dtype", "float32",
                       "--backend", "torch", "--contenders", "dma", "sdpa", "--reps", "2",
                       "--csv", str(tmp_path / "masks.csv")])
    assert len(rows) == 4 and all(r["ms"] > 0 and not r["note"] for r in rows)
    assert (tmp_path / "masks.csv").exists()
