"""One study run by 1, 2 and 4 Slurm array tasks against the same study run by `--workers`
1, 2 and 4 (`make bench-slurm`), on a one-machine Slurm and one PostgreSQL + MLflow server,
all on this machine; and what Slurm itself takes to start and end N tasks.

Each pair (array of N, `--workers N`) runs its own study of the same size, alternated in one
run, so the figures compare. Wall time counts from `sbatch` (or the command's start) to the
last task's end (or the command's exit); writing the script (`optimsweep slurm`, one Python
start) is not counted. Slurm's own overhead is measured apart: an array
of N tasks that run `true`, from `sbatch` to the last one gone from `squeue`. With
--results DIR the table is also written to DIR/bench_slurm.md with the date, commit and CPU
(`make bench-slurm`: docs/results).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import yaml

import results
from cpu import cpu_line
from optimsweep import local_slurm, services


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_file(folder: Path, name: str, n_trials: int, epochs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "task": "regression", "model": "linear", "metric": "val_loss",
        "sampler": {"name": "random"}, "pruner": {"name": "none"},
        "budget": {"n_trials": n_trials, "epochs": epochs},
        "search_space": {
            "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
            "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
            "batch_size": 16}}))
    return path


def wait_gone(cluster, job: str) -> None:
    while cluster.run("squeue", "-h", "-j", job, check=False).strip():
        time.sleep(0.1)


def by_slurm(cluster, env: dict, folder: Path, tasks: int, n_trials: int,
             epochs: int) -> float:
    path = sweep_file(folder, f"slurm{tasks}-{int(time.time())}", n_trials, epochs)
    subprocess.run([sys.executable, "-m", "optimsweep.cli", "slurm", str(path), "--array",
                    str(tasks), "--out", str(folder / "job.sbatch")], cwd=folder, env=env,
                   capture_output=True, text=True, check=True)
    start = time.perf_counter()  # from sbatch, as `--workers` from its command's start
    job = cluster.run("sbatch", "--parsable", str(folder / "job.sbatch"), cwd=folder).strip()
    job = job.split(";")[0]
    wait_gone(cluster, job)
    wall = time.perf_counter() - start
    failed = [line for line in cluster.run("scontrol", "show", "job", job, "-o",
                                           check=False).splitlines()
              if "ExitCode=0:0" not in line]
    if failed:
        raise SystemExit(f"a task failed: {failed[0]}")
    return wall


def by_workers(env: dict, folder: Path, workers: int, n_trials: int, epochs: int) -> float:
    path = sweep_file(folder, f"workers{workers}-{int(time.time())}", n_trials, epochs)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optimsweep.cli", "sweep", str(path),
                    "--workers", str(workers), "--no-progress"], cwd=folder, env=env,
                   capture_output=True, check=True)
    return time.perf_counter() - start


def empty_array(cluster, folder: Path, tasks: int) -> float:
    start = time.perf_counter()
    job = cluster.run("sbatch", "--parsable", f"--array=0-{tasks - 1}",
                      f"--output={folder}/empty-%A_%a.out", "--wrap", "true").strip()
    wait_gone(cluster, job.split(";")[0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="medians of this many, the "
                        "array and --workers alternated (A B, then B A)")
    results.option(parser)
    args = parser.parse_args()
    out = results.Results(args.results, __file__, "bench-slurm")
    print(f"{cpu_line()}; regression task, {args.n_trials} trials of {args.epochs} epochs "
          "per study; one PostgreSQL, one MLflow server, a one-machine Slurm (2 tasks a "
          "core)", flush=True)
    root = Path(tempfile.mkdtemp(prefix="optimsweep-bench-slurm-"))
    root.chmod(0o711)  # the postgres user reaches its data folder inside
    rows = []
    try:
        endpoints = services.start(root / "services", free_port(), free_port())
        cluster = local_slurm.start(root / "slurm", free_port(), free_port())
        env = cluster.environ({**os.environ, "OPTIMSWEEP_STORAGE": endpoints.storage,
                               "MLFLOW_TRACKING_URI": endpoints.tracking_uri})
        for n in args.tasks:
            folder, times = root / f"n{n}", {"array": [], "workers": [], "empty": []}
            for r in range(args.rounds):
                runs = [("array", partial(by_slurm, cluster, env, folder, n, args.n_trials,
                                          args.epochs)),
                        ("workers", partial(by_workers, env, folder, n, args.n_trials,
                                            args.epochs))]
                for what, measure in runs if r % 2 == 0 else runs[::-1]:
                    times[what].append(measure())
                times["empty"].append(empty_array(cluster, folder, n))
                print(f"  {n} round {r + 1}: array {times['array'][-1]:.1f} s, --workers "
                      f"{times['workers'][-1]:.1f} s, empty array {times['empty'][-1]:.2f} s",
                      flush=True)
            rows.append((n, *(statistics.median(times[k]) for k in ("array", "workers",
                                                                   "empty"))))
    finally:
        local_slurm.stop(root / "slurm")
        services.stop(root / "services")
        shutil.rmtree(root, ignore_errors=True)
    print(f"medians of {args.rounds} rounds:")
    print(f"{'N':>2} {'array of N (s)':>15} {'--workers N (s)':>16} {'array/workers':>14} "
          f"{'empty array of N (s)':>21}")
    for n, slurm, workers, empty in rows:
        print(f"{n:>2} {slurm:>15.1f} {workers:>16.1f} {slurm / workers:>13.2f}x "
              f"{empty:>21.2f}")
    out.write([results.Table(
        ["N", "array of N tasks", "`--workers N`", "array / workers",
         "empty array of N tasks (Slurm alone)"],
        [[n, f"{slurm:.1f} s", f"{workers:.1f} s", f"{slurm / workers:.2f}x", f"{empty:.2f} s"]
         for n, slurm, workers, empty in rows],
        f"{args.n_trials} regression trials of {args.epochs} epochs a study; medians of "
        f"{args.rounds} rounds, array and `--workers` alternated; wall time from `sbatch`, or "
        "from the command's start; one PostgreSQL, one MLflow server and a one-machine Slurm "
        "on the same cores.")])


if __name__ == "__main__":
    main()
