"""`make bench` is a script, not a test of speed: here it only has to run and report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_core.py"


def test_bench_runs_every_loop_side_by_side_and_prints_each_ratio():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "2", "--train-images", "1280"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "train images: 1280" in out
    rounds = [line for line in out.splitlines() if re.match(r"\s+[12] ", line)]
    assert len(rounds) == 2, out
    speedup = re.search(r"speed-up over the tutorial at batch 64: ([\d.]+)x", out)
    ceiling = re.search(r"matmuls alone would give ([\d.]+)x", out)
    roofline = re.search(r"share of the matmul roofline .*: ([\d.]+)%", out)
    assert speedup and ceiling and roofline, out
    # the matmuls alone are a floor: nothing that also runs activations, a loss, autograd
    # and an optimizer can beat them
    assert float(ceiling.group(1)) > float(speedup.group(1)) > 0
    assert 0 < float(roofline.group(1)) < 150
