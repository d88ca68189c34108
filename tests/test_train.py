"""`python -m dma train` runs end to end (a few steps) and writes its table and plot."""

import subprocess
import sys


def test_train_job_runs(tmp_path):
    plot = tmp_path / "mqar.png"
    out = subprocess.run(
        [sys.executable, "-m", "dma", "train", "--steps", "3", "--batch", "4", "--pairs", "4",
         "--queries", "4", "--window", "4", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for variant in ("dense", "sliding", "dma"):
        assert variant in out.stdout
    assert "accuracy" in out.stdout
    if "no plot" not in out.stdout:
        assert plot.exists() and plot.stat().st_size > 0
