"""Trials per minute for 1, 2 and 4 workers against one PostgreSQL and one MLflow server
(`make bench-scaling`), and the connections each worker holds to the study database.

Each worker is `optimsweep sweep FILE` in its own folder, as on separate machines; every
count of workers runs its own study of the same size, one after another in one run, so the
figures compare. "Wall" counts from starting the workers to the last one exiting (process
start and the study's closing summary included); "trials" counts from the first trial's
start to the last trial's end, from Optuna's own timestamps. With --results DIR the table is
also written to DIR/bench_scaling.md with the date, commit and CPU (`make bench-scaling`:
docs/results).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

import results
from cpu import cpu_line
from optimsweep import services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_doc(name: str, n_trials: int, epochs: int) -> dict:
    return {"name": name, "task": "regression", "model": "linear", "metric": "val_loss",
            "sampler": {"name": "random"}, "pruner": {"name": "none"},
            "budget": {"n_trials": n_trials, "epochs": epochs},
            "search_space": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
                "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
                "batch_size": 16}}


def run(endpoints, root: Path, workers: int, n_trials: int, epochs: int) -> dict:
    name = f"scale-{workers}w-{int(time.time())}"
    env = {**os.environ, "OPTIMSWEEP_STORAGE": endpoints.storage,
           "MLFLOW_TRACKING_URI": endpoints.tracking_uri}
    processes = []
    start = time.perf_counter()
    for i in range(workers):
        folder = root / name / f"worker{i}"
        folder.mkdir(parents=True)
        (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep_doc(name, n_trials, epochs)))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "optimsweep.cli", "sweep", "sweep.yaml", "--no-progress"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    peak: dict[str, int] = {}
    while any(p.poll() is None for p in processes):
        for client, n in services.connections(endpoints).items():
            if client.startswith("optimsweep"):
                pid = client.rsplit(" ", 1)[-1]
                peak[pid] = max(peak.get(pid, 0), n)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    for p in processes:
        if p.returncode != 0:
            raise SystemExit(f"a worker failed: {p.stderr.read()}")
    study = optuna.load_study(study_name=name, storage=endpoints.storage)
    trials = study.trials
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    return {"workers": workers, "trials": len(trials), "wall": wall,
            "busy": (last - first).total_seconds(),
            "pids": len({t.user_attrs["pid"] for t in trials}),
            "connections": max(peak.values()) if peak else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    results.option(parser)
    args = parser.parse_args()
    out = results.Results(args.results, __file__, "bench-scaling")
    print(f"{cpu_line()}; regression task, {args.n_trials} "
          f"trials of {args.epochs} epochs per study; one PostgreSQL, one MLflow server")
    root = Path(tempfile.mkdtemp(prefix="optimsweep-bench-"))
    root.chmod(0o711)  # the postgres user reaches its data folder inside
    try:
        endpoints = services.start(root / "services", free_port(), free_port())
        rows = [run(endpoints, root, n, args.n_trials, args.epochs) for n in args.workers]
    finally:
        services.stop(root / "services")
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["trials"] / rows[0]["busy"]
    print(f"{'workers':>7} {'trials':>6} {'wall s':>7} {'trials/min (wall)':>18} "
          f"{'trials/min (trials)':>20} {'vs 1 worker':>11} {'peak conns/worker':>18}")
    for r in rows:
        print(f"{r['workers']:>7} {r['trials']:>6} {r['wall']:>7.1f} "
              f"{60 * r['trials'] / r['wall']:>18.1f} {60 * r['trials'] / r['busy']:>20.1f} "
              f"{r['trials'] / r['busy'] / base:>10.2f}x {r['connections']:>18}")
    out.write([results.Table(
        ["workers", "trials/min while trials run", "ratio",
         "trials/min, process start and summary included", "connections per worker (peak)"],
        [[r["workers"], f"{60 * r['trials'] / r['busy']:.1f}",
          f"{r['trials'] / r['busy'] / base:.2f}x", f"{60 * r['trials'] / r['wall']:.1f}",
          r["connections"]] for r in rows],
        f"{args.n_trials} regression trials of {args.epochs} epochs a study, each worker "
        "`optimsweep sweep` in its own folder; one PostgreSQL and one MLflow server on the "
        "same machine.")])


if __name__ == "__main__":
    main()
