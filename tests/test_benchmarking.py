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


def test_target_verdicts():
    """The target table judges both timings against each limit, and says which cases did
    not run or could not be measured."""
    targets = benchmark_script("targets")
    case = "16k"

    def row(contender, mode, ms, b2b, note=""):
        return dict(case=case, contender=contender, mode=mode, ms=ms, ms_b2b=b2b,
                    extra_mib=1.0, note=note)

    rows = [row("dma-triton", "fwd", 1.0, 0.9), row("sdpa-cudnn", "fwd", 4.0, 2.0),
            row("dma-cupy", "fwd", 1.6, 1.0), row("flex", "fwd", math.nan, math.nan, "no flex"),
            row("dma-triton", "fwd+bwd", 1.0, 1.0), row("sdpa-cudnn", "fwd+bwd", 2.0, 2.0),
            row("dma-cupy", "fwd+bwd", 1.0, 1.0)]
    table = targets.verdicts(rows, [], "triton", "cupy", {case})
    met = {(t["backend"], t["case"], t["mode"], t["against"]): t["met"] for t in table}
    assert met[("triton", case, "fwd", "sdpa-cudnn")] == "from idle only"  # 0.25, 0.45
    assert met[("triton", case, "fwd+bwd", "sdpa-cudnn")] == "no"  # 0.5 against 0.35
    assert met[("cupy", case, "fwd", "sdpa-cudnn")] == "from idle only"  # 0.4, 0.5
    assert met[("cupy", case, "fwd", "dma-triton")] == "back to back only"  # 1.6, 1.11
    assert met[("cupy", case, "fwd+bwd", "sdpa-cudnn")] == "yes"  # 0.5 against 0.55
    assert met[("triton", case, "fwd", "flex")] == "not measured"
    assert met[("triton", "128k", "fwd", "sdpa-cudnn")] == "not run"
    assert "from idle only" in targets.format_verdicts(table)


def test_targets_run_on_cpu(tmp_path):
    targets = benchmark_script("targets")
    table = targets.main(["--device", "cpu", "--scale", "256", "--backends", "torch",
                          "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                          "--reps", "1", "--cases", "nowindow", "plan",
                          "--out", str(tmp_path)])
    met = {(t["backend"], t["case"], t["mode"], t["against"]): t for t in table}
    assert met[("torch", "nowindow", "fwd", "sdpa-flash")]["ratio_idle"] > 0
    assert met[("torch", "plan", "fwd", "plan share")]["met"] == "not measured"
    assert (tmp_path / "rows.csv").exists() and (tmp_path / "targets.csv").exists()
