"""Time to quality: how soon does a sweep find a good model? Everything side by side in one run.

The default study (`sweeps/fashion_mnist.yaml`: the tutorial MLP on FashionMNIST, TPE over
optimizer, learning rate, batch size, weight decay and LR schedule) is run whole, each time
by a fresh `optimsweep sweep FILE --no-progress` process in a temporary folder with its own
journal storage and SQLite MLflow store, with only its pruner changed:

  median  the pruner the file shipped with before: {name: median, n_startup_trials: 5,
          n_warmup_steps: 3};
  sh      Optuna's successive halving, the stopping form:
          {name: successive_halving, min_resource: 1, reduction_factor: 3};
  asha    successive halving with promotion: {name: asha, min_resource: 1,
          reduction_factor: 3} (a trial below its rung's top 1/3 is paused, promoted later);
  asha4   the same with a report every quarter epoch (budget.report_every: 0.25): rungs
          at 1/4, 3/4, 2 1/4 and 6 3/4 epochs;
  peer    benchmarks/peer_sweep.py: the PyTorch tutorial's own training code driven by
          Optuna as its documentation shows (study.optimize, TPESampler, the median
          variant's MedianPruner, optuna_integration's MLflowCallback), the same search
          space, baseline, split and seed.

For each sampler seed (the sweep file's `seed:`, which is also every trial's training seed;
the peer's `--seed` likewise), all variants run one after another before the next seed, so
a slow phase of the machine hits them alike. Each run's timeline comes from its trials after
the process ends: a point each time a trial finished (Optuna's `datetime_complete`, in wall
seconds since the benchmark started the process, so Python's start, imports and data
loading count), carrying the best validation accuracy so far (COMPLETE trials' values) and
that best trial's test accuracy (`user_attrs["test_accuracy"]`, reported, never chosen on).
Trial-epochs are the epochs every trial reported (its intermediate values): what was trained.

Printed, per seed and variant: wall seconds, trial-epochs, trials finished, the final best
validation accuracy and its test accuracy; the time until the best-on-validation config had
a test accuracy of at least TARGET (89.5%) and its ratio to the peer's; the time at which
the best so far reached its final value; ratios against the median variant of the same seed;
each optimsweep variant's best when the shortest of them ended (the forms at equal time);
then the median of those per-seed ratios. Written into --out (default: benchmarks/, where
the README can embed the plot): time_to_quality.png, best validation accuracy so far against
elapsed seconds (one panel per seed, one line per variant; its title states the scale), and
time_to_quality.json, every run's trials, timeline, summary and the end of its output.

On a 2-core CPU the full default study takes 7 to 15 minutes per variant per seed, the peer
30: by default the slow references (median and peer) run for the first seed only and the
two forms of successive halving for every seed, about 100 minutes in all. --train-subset,
--val-size, --epochs, --n-trials and --timeout scale it down. Wall times are only
comparable on an otherwise idle machine. With --results DIR the first seed's table and, for
several seeds, the variants run for every seed side by side are also written to
DIR/bench_time_to_quality.md with the date, commit and CPU (`make bench-quality`:
docs/results).

Usage: python benchmarks/bench_time_to_quality.py [--seeds 0,1,2]
       [--variants median,sh,asha,peer] [--first-seed-only median,peer] [--train-subset N]
       [--val-size N] [--epochs N] [--n-trials N] [--timeout S (3600)] [--out DIR]
       [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml

import results
from bench_sweep import DEFAULT_STUDY, ROOT, machine
from peer_sweep import trial_record

TARGET = 0.895  # test accuracy a config must reach
PRUNERS = {
    "median": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 3},  # as shipped
    # before successive halving became the default
    "sh": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    "asha": {"name": "asha", "min_resource": 1, "reduction_factor": 3},
    "asha4": {"name": "asha", "min_resource": 1, "reduction_factor": 3},
}
# Rungs within epochs: a report (and a rung step) every quarter epoch.
BUDGETS = {"asha4": {"report_every": 0.25}}
VARIANTS = (*PRUNERS, "peer")
PEER = Path(__file__).resolve().parent / "peer_sweep.py"
GRACE_S = 900
LABELS = {"median": "median (`n_startup_trials: 5, n_warmup_steps: 3`, shipped before)",
          "sh": "Optuna's `successive_halving` (stopping form, η = 3)",
          "asha": "`asha` (promotion form, η = 3, the default)",
          "asha4": "`asha`, rungs every quarter epoch (`report_every: 0.25`)",
          "peer": "the peer: the tutorial's DataLoader loops, `study.optimize`, TPE, the "
                  "median pruner, `MLflowCallback`"}
SHORT = {"median": "median", "sh": "`successive_halving`", "asha": "`asha`",
         "asha4": "`asha` by quarter epochs", "peer": "the peer"}


def study_doc(args) -> dict:
    """The default study's file with the scale flags applied."""
    doc = yaml.safe_load(DEFAULT_STUDY.read_text())
    budget = doc["budget"]
    for key in ("n_trials", "epochs", "timeout"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    if args.val_size is not None:
        doc["data"]["val_size"] = args.val_size
    if args.train_subset is not None:
        doc["data"]["train_subset"] = args.train_subset
    return doc


def child_env() -> dict:
    """The environment of every run: the project's data, and no tracking server from the
    shell (MLFLOW_TRACKING_URI would win over the file's tracking_uri)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OPTIMSWEEP_DATA": str(ROOT / "data"), "PYTHONUNBUFFERED": "1"}


def limit(doc: dict) -> float:
    """Seconds after which a run is killed: its timeout and one whole trial more (a trial
    running at the deadline still finishes)."""
    return (doc["budget"].get("timeout") or 24 * 3600) + GRACE_S


def launch(argv: list[str], folder: Path, seconds: float) -> dict:
    """One process run in `folder`: its start (time.time()), wall seconds, error (None if
    it exited 0) and the end of what it printed."""
    start = time.time()
    with open(folder / "output.log", "w+") as log:
        try:
            code = subprocess.run(argv, cwd=folder, env=child_env(), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=seconds).returncode
            error = f"exit {code}" if code else None
        except subprocess.TimeoutExpired:
            error = f"killed after {seconds:.0f} s"
        wall = time.time() - start
        log.seek(0)
        tail = log.read()[-3000:]
    return {"start": start, "wall": wall, "error": error and f"{error}: {tail[-800:]}",
            "log_tail": tail}


def run_optimsweep(variant: str, seed: int, doc: dict, folder: Path) -> dict:
    doc = {**doc, "seed": seed, "storage": str(folder / "optuna.journal"),
           "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"}
    doc["pruner"] = PRUNERS[variant]
    doc["budget"] = {**doc["budget"], **BUDGETS.get(variant, {})}
    sweep = folder / DEFAULT_STUDY.name
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
    argv = [sys.executable, "-m", "optimsweep.cli", "sweep", str(sweep), "--no-progress"]
    run = launch(argv, folder, limit(doc))
    run["trials"] = []
    if (folder / "optuna.journal").exists():
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
        study = optuna.load_study(study_name=doc["name"], storage=storage)
        per_epoch = round(1 / doc["budget"].get("report_every", 1))
        run["trials"] = [trial_record(t) for t in study.trials]
        for record in run["trials"]:  # reports, a quarter epoch each with asha4
            record["epochs"] /= per_epoch
    return run


def run_peer(seed: int, doc: dict, folder: Path) -> dict:
    budget, data = doc["budget"], doc["data"]
    out = folder / "trials.json"
    argv = [sys.executable, str(PEER), "--seed", str(seed), "--n-trials",
            str(budget["n_trials"]), "--epochs", str(budget["epochs"]), "--timeout",
            str(budget.get("timeout") or 0), "--val-size", str(data["val_size"]), "--split-seed",
            str(data["split_seed"]), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--trials-out", str(out)]
    if data.get("train_subset") is not None:
        argv += ["--train-subset", str(data["train_subset"])]
    run = launch(argv, folder, limit(doc))
    run["trials"] = json.loads(out.read_text()) if out.exists() else []
    return run


def timeline(run: dict) -> list[dict]:
    """A point per finished trial, in finishing order: elapsed seconds, and the best
    validation accuracy so far with that trial's test accuracy (None before any COMPLETE)."""
    points, best = [], None
    finished = sorted((t for t in run["trials"] if t["complete"] is not None),
                      key=lambda t: t["complete"])
    for t in finished:
        if t["state"] == "COMPLETE" and (best is None or t["value"] > best["value"]):
            best = t
        points.append({"t": t["complete"] - run["start"], "trial": t["number"],
                       "state": t["state"],
                       "best_val": best["value"] if best else None,
                       "best_test": best["test_accuracy"] if best else None,
                       "best_trial": best["number"] if best else None})
    return points


def summary(run: dict) -> dict:
    points = run["timeline"]
    last = points[-1] if points and points[-1]["best_val"] is not None else None
    reached = next((p["t"] for p in points
                    if p["best_test"] is not None and p["best_test"] >= TARGET), None)
    final_at = next((p["t"] for p in points if last and p["best_trial"] ==
                     last["best_trial"]), None)
    counted = [t for t in run["trials"] if not t["interrupted"]]  # a retry repeats its epochs
    failed = [t for t in run["trials"] if t["state"] == "FAIL"]
    return {"failed": len(failed), "first_error": failed[0]["error"] if failed else None,
            "wall": run["wall"], "trial_epochs": sum(t["epochs"] for t in counted),
            "finished": len(points), "best_val": last and last["best_val"],
            "best_test": last and last["best_test"], "to_target": reached,
            "to_final": final_at}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


COLUMNS = [("wall s", "wall", ".0f", 7), ("trial-ep", "trial_epochs", ".0f", 8),
           ("trials", "finished", "d", 6), ("best val", "best_val", ".2%", 8),
           ("its test", "best_test", ".2%", 8), (f">={TARGET:.1%} s", "to_target", ".0f", 9),
           ("/peer", "target_vs_peer", ".2f", 5), ("final s", "to_final", ".0f", 7),
           ("wall/med", "wall_vs_median", ".2f", 8), ("ep/med", "epochs_vs_median", ".2f", 6),
           ("tgt/med", "target_vs_median", ".2f", 7), ("fin/med", "final_vs_median", ".2f", 7)]
RATIOS = {"target_vs_peer": ("to_target", "peer"), "wall_vs_median": ("wall", "median"),
          "epochs_vs_median": ("trial_epochs", "median"),
          "target_vs_median": ("to_target", "median"), "final_vs_median": ("to_final", "median")}


def add_ratios(rows: dict[str, dict]) -> None:
    """Each variant's ratios against another variant of the same seed."""
    for row in rows.values():
        for name, (key, other) in RATIOS.items():
            row[name] = ratio(row[key], rows[other][key]) if other in rows else None


def print_table(seed: int, rows: dict[str, dict], errors: dict[str, str]) -> None:
    print(f"\nseed {seed}")
    print(f"  {'variant':<7} " + " ".join(f"{h:>{w}}" for h, _, _, w in COLUMNS))
    for variant, row in rows.items():
        print(f"  {variant:<7} " + " ".join(fmt(row[k], s, w) for _, k, s, w in COLUMNS))
    for variant, row in rows.items():
        if row["failed"]:
            print(f"  {variant}: {row['failed']} trial(s) failed; the first: "
                  f"{row['first_error']}")
    for variant, error in errors.items():
        print(f"  {variant}: the process failed ({error})")


def print_medians(tables: list[dict[str, dict]]) -> None:
    print(f"\nmedian over {len(tables)} seeds of the per-seed ratios (- where a side is "
          "missing in every seed):")
    for variant in tables[0]:
        cells = []
        for name in RATIOS:
            values = [t[variant][name] for t in tables
                      if variant in t and t[variant][name] is not None]
            cells.append(f"{name} {fmt(statistics.median(values) if values else None, '.2f', 5)}")
        ran = [t for t in tables if variant in t]
        hits = sum(t[variant]["to_target"] is not None for t in ran)
        print(f"  {variant:<7} " + "  ".join(cells) + f"  target reached in {hits}/{len(ran)}")


def best_at(run: dict, seconds: float) -> dict | None:
    """The timeline's last point at or before `seconds` that has a COMPLETE best."""
    points = [p for p in run["timeline"] if p["t"] <= seconds and p["best_val"] is not None]
    return points[-1] if points else None


def print_equal_time(seed: int, runs: list[dict]) -> None:
    """Each optimsweep variant's best so far when the shortest of them ended: the forms
    compared at equal time, not each at its own end."""
    ours = [r for r in runs if r["seed"] == seed and r["variant"] != "peer"]
    if len(ours) < 2:
        return
    at = min(r["wall"] for r in ours)
    cells = []
    for run in ours:
        point = best_at(run, at)
        cells.append(f"{run['variant']} " + ("-" if point is None else
                                            f"{point['best_val']:.2%} / {point['best_test']:.2%}"))
    print(f"  at {at:.0f} s (the shortest run's end), best val / its test: " + "; ".join(cells))


# Line styles as well as colours: variants that found the same trials overlap.
STYLES = {"median": ("tab:blue", "-"), "sh": ("tab:orange", "--"), "asha": ("tab:green", "-."),
          "asha4": ("tab:red", (0, (5, 1, 1, 1))), "peer": ("tab:gray", ":")}


def plot(runs: list[dict], seeds: list[int], scale: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(max(6.5, 5 * len(seeds)), 4.5),
                             sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        for run in (r for r in runs if r["seed"] == seed):
            points = [p for p in run["timeline"] if p["best_val"] is not None]
            if not points:
                continue
            ts = [p["t"] for p in points] + [max(run["wall"], points[-1]["t"])]
            vals = [p["best_val"] for p in points] + [points[-1]["best_val"]]
            color, style = STYLES[run["variant"]]
            ax.step(ts, vals, where="post", color=color, linestyle=style,
                    label=run["variant"], linewidth=1.8)
            hit = run["summary"]["to_target"]
            if hit is not None:
                at = next(p["best_val"] for p in points if p["t"] >= hit)
                ax.plot([hit], [at], marker="*", markersize=11, color=color)
        ax.set_title(f"seed {seed}")
        ax.set_xlim(left=0)  # the process start: start-up and data loading count
        ax.set_xlabel("elapsed wall seconds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best validation accuracy so far")
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"Time to quality: {scale}\n* the best-on-validation config first has "
                 f"test accuracy >= {TARGET:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scale_text(doc: dict) -> str:
    data, budget = doc["data"], doc["budget"]
    train = data.get("train_subset") or 60_000 - data["val_size"]
    return (f"{train} training / {data['val_size']} validation images, {budget['n_trials']} "
            f"trials x {budget['epochs']} epochs, timeout {budget['timeout']:g} s")


def val_test(point: dict | None) -> str:
    if point is None or point.get("best_val") is None:
        return "-"
    return f"{point['best_val']:.2%} / {point['best_test']:.2%}"


def results_tables(seeds: list[int], tables: list[dict[str, dict]], runs: list[dict],
                   notes: list[str], doc: dict) -> tuple[list[results.Table], list[str]]:
    """The first seed's variants (the table as the README had it), then, for several seeds,
    the variants run for every seed with their best at the shorter run's end."""
    first = tables[0]

    def wall(variant: str, row: dict) -> str:
        ratio = row["wall_vs_median"]
        return f"{row['wall']:.0f} s" + (f" ({ratio:.2f}x)" if variant != "median"
                                         and ratio is not None else "")

    out = [results.Table(
        [f"seed {seeds[0]}", "wall", "trial-epochs", "best val / its test",
         f"first best-on-val config at >= {TARGET:.1%} test"],
        [[LABELS[v], wall(v, row), f"{row['trial_epochs']:.0f}", val_test(row),
          fmt(row["to_target"], ".0f", 0) + ("" if row["to_target"] is None else " s")]
         for v, row in first.items()],
        f"The default study, {scale_text(doc)}, a fresh process a run; seconds from its "
        "start (imports and data loading count); selected on validation, test reported; "
        "ratios against the median pruner's wall.")]
    every = [v for v in first if all(v in t for t in tables)]
    ours = [v for v in every if v != "peer"]
    if len(seeds) > 1 and every:
        header = ["seed", *(f"{SHORT[v]}: wall, best val / test" for v in every)]
        if len(ours) > 1:
            header.append(f"at the shorter run's end: {' / '.join(SHORT[v] for v in ours)}, "
                          "best val / test")
        rows = []
        for seed, table in zip(seeds, tables, strict=True):
            row = [seed, *(f"{table[v]['wall']:.0f} s, {val_test(table[v])}" for v in every)]
            if len(ours) > 1:
                at = min(table[v]["wall"] for v in ours)
                seeds_runs = {r["variant"]: r for r in runs if r["seed"] == seed}
                row.append(f"at {at:.0f} s: " + " against ".join(
                    val_test(best_at(seeds_runs[v], at)) for v in ours))
            rows.append(row)
        out.append(results.Table(header, rows))
    return out, notes


def one_run(variant: str, seed: int, doc: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ttq-{variant}-") as tmp:
        folder = Path(tmp)
        run = run_peer(seed, doc, folder) if variant == "peer" else \
            run_optimsweep(variant, seed, doc, folder)
    run.update(variant=variant, seed=seed)
    run["timeline"] = timeline(run)
    run["summary"] = summary(run)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="median,sh,asha,peer")
    parser.add_argument("--first-seed-only", default="median,peer", metavar="VARIANTS",
                        help="of --variants, those run for the first seed only (the slow "
                             "references: 15 and 30 minutes a seed); '' runs all for each")
    parser.add_argument("--train-subset", type=int, default=None, help="training images kept")
    parser.add_argument("--val-size", type=int, default=None, help="validation images")
    parser.add_argument("--epochs", type=int, default=None, help="per trial")
    parser.add_argument("--n-trials", type=int, default=None, help="per study")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds per study (the file's 900 would cut the median "
                             "pruner's study short)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    results.option(parser)
    args = parser.parse_args()
    out = results.Results(args.results, __file__, "bench-quality")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    first_only = [v for v in args.first_seed_only.split(",") if v]
    for flag, given in (("--variants", variants), ("--first-seed-only", first_only)):
        unknown = set(given) - set(VARIANTS)
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(VARIANTS)}")
    doc = study_doc(args)
    print(machine(torch.device("cpu")))
    print(f"\ntime to quality of {DEFAULT_STUDY.name}: {scale_text(doc)}; target: test "
          f"accuracy >= {TARGET:.1%} of the best-on-validation config")
    print("columns: seconds since the process started; ratios against the same seed's peer "
          "(/peer) or median variant (/med)")
    runs, tables, notes = [], [], []
    began = time.time()
    for seed in seeds:
        rows, errors = {}, {}
        for variant in variants:
            if variant in first_only and seed != seeds[0]:
                continue
            run = one_run(variant, seed, doc)
            runs.append(run)
            rows[variant] = dict(run["summary"])
            if run["error"]:
                errors[variant] = run["error"]
        add_ratios(rows)
        tables.append(rows)
        notes += [f"Seed {seed}, {v}: {row['failed']} trial(s) failed." for v, row in rows.items()
                  if row["failed"]]
        notes += [f"Seed {seed}, {v}: the process failed ({e.split(':')[0]})."
                  for v, e in errors.items()]
        print_table(seed, rows, errors)
        print_equal_time(seed, runs)
    if len(seeds) > 1:
        print_medians(tables)
    args.out.mkdir(parents=True, exist_ok=True)
    png, js = args.out / "time_to_quality.png", args.out / "time_to_quality.json"
    plot(runs, seeds, scale_text(doc), png)
    js.write_text(json.dumps({"machine": machine(torch.device("cpu")), "scale": scale_text(doc),
                              "target": TARGET, "runs": runs}, indent=1))
    print(f"\n{time.time() - began:.0f} s in all; wrote {png} and {js}")
    out.write(*results_tables(seeds, tables, runs, notes, doc))


if __name__ == "__main__":
    main()
