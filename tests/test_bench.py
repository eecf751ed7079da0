"""`make bench` and `make bench-core` are scripts, not tests of speed: here they only have to
run and report."""

from __future__ import annotations

import re
from pathlib import Path

from records import run_script

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run(script: str, *args: str) -> str:
    """`python benchmarks/SCRIPT ARGS`, forked from the tests' server that has imported
    torch, Optuna and MLflow already (the processes each script starts are new Pythons, as
    the benchmark measures them)."""
    return run_script(BENCHMARKS / script, *args, cwd=ROOT)


def test_bench_sweep_prints_the_machine_and_each_variants_ratio(tmp_path):
    """(Fused groups of K > 1 are the same table rows; each variant is a process of its
    own, so the test keeps to K = 1.) With --results, the tables it printed are written
    under the date, commit and CPU they were measured on, as the docs include them."""
    out = run("bench_sweep.py", "--rounds", "1", "--ks", "1", "--epochs", "2",
              "--train-images", "640", "--skip-study", "--results", tmp_path)
    assert re.search(r"^CPU: .+, \d+ cores, torch threads \d+; flags: ", out, re.M), out
    assert re.search(r"^precision auto here: (fp32|bf16); fuse auto here: \d+$", out, re.M)
    ratios = dict(re.findall(r"K=(\d+ +\w+):.*= +([\d.]+)x", out))
    assert set(ratios) == {"1   fp32", "1   bf16"}, out
    assert ratios["1   fp32"] == "1.00" and all(float(r) > 0 for r in ratios.values())
    assert re.search(r"adam/sgd = [\d.]+x", out), out
    written = (tmp_path / "bench_sweep.md").read_text()
    lines = written.splitlines()
    assert lines[0] == ("<!-- written by `make bench` (benchmarks/bench_sweep.py); rerun it to "
                        "replace this file -->"), written
    assert re.fullmatch(r"\*Measured \d{4}-\d\d-\d\d( at commit [0-9a-f]{7,}( with local "
                        r"changes)?|, commit unknown,) on .+, \d+ cores \(flags: .+\); "
                        r"`python benchmarks/bench_sweep\.py --rounds 1 .*--skip-study`\.\*",
                        lines[2]), written
    machine = re.search(r"^CPU: (.+, \d+ cores), torch threads", out, re.M).group(1)
    assert f" on {machine} (flags: " in lines[2], written
    assert "| sequential core (a group of one) | " in written, written
    assert re.search(r"^\| seconds, all 2 epochs \| [\d.]+ \| [\d.]+ \([\d.]+x SGD",
                     written, re.M), written


def test_bench_core_runs_every_loop_side_by_side_and_prints_each_ratio():
    # The roofline from 2048 x 2048 products alone: 4096 would take half of this test.
    out = run("bench_core.py", "--rounds", "1", "--train-images", "1280",
              "--roofline-sizes", "2048")
    assert "train images: 1280" in out
    rounds = [line for line in out.splitlines() if re.match(r"\s+1 ", line)]
    assert len(rounds) == 1, out
    speedup = re.search(r"speed-up over the tutorial at batch 64: ([\d.]+)x", out)
    ceiling = re.search(r"matmuls alone would give ([\d.]+)x", out)
    roofline = re.search(r"share of the matmul roofline .*: ([\d.]+)%", out)
    assert speedup and ceiling and roofline, out
    # Both are measured, one round each: which is larger is the benchmark's finding, not
    # the test's (under the suite's load the ceiling measured 2.86x against 2.93x)
    assert float(ceiling.group(1)) > 0 and float(speedup.group(1)) > 0
    assert 0 < float(roofline.group(1)) < 150


def test_bench_checkpoints_prints_each_variants_writes_and_shares():
    # Two epochs: the one checkpoint of `every: 0` (none is written after the last epoch).
    out = run("bench_checkpoints.py", "--rounds", "1", "--epochs", "2",
              "--train-images", "640")
    assert re.search(r"^CPU: .+, \d+ cores, torch threads \d+; flags: ", out, re.M), out
    assert "2 epochs (fewer than the study's 15)" in out, out
    each = re.search(r"every: 0 \(each epoch\) +[\d.]+ s per trial .*; 1 writes, [\d.]+ s = "
                     r"[\d.]+% of training; wall [\d.]+x no checkpoints", out)
    auto = re.search(r"every: auto +[\d.]+ s per trial .*; [01] writes, [\d.]+ s = "
                     r"[\d.]+% of training; wall [\d.]+x", out)
    assert each and auto, out
    size = re.search(r"^checkpoint file: ([\d.]+) MB; files kept per run: 1$", out, re.M)
    assert size and float(size.group(1)) > 2.7, out  # the MLP's weights alone: 2.7 MB
    assert re.search(r"^target: every: auto .*: (met|MISSED) \([\d.]+%\)$", out, re.M), out


def test_bench_time_to_quality_runs_each_variant_and_the_peer_and_plots_them(tmp_path):
    out = run("bench_time_to_quality.py", "--variants", "asha,peer", "--train-subset", "1000",
              "--val-size", "500", "--epochs", "2", "--n-trials", "3", "--seeds", "0",
              "--out", str(tmp_path))
    assert re.search(r"^CPU: .+, \d+ cores, torch threads \d+; flags: ", out, re.M), out
    rows = dict(re.findall(r"^  (asha|peer) +\d+ +(\d+) +3 ", out, re.M))
    assert set(rows) == {"asha", "peer"} and int(rows["peer"]) == 6, out  # 3 trials x 2
    assert (tmp_path / "time_to_quality.png").stat().st_size > 10_000
    assert (tmp_path / "time_to_quality.json").exists()
