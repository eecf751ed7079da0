"""Trials per hour: the sweep-level benchmark (`make bench`). Everything side by side in one run.

1. Trial-epochs per second on the full 50k training images at batch 64, for configurations
   drawn from the default study's search space: the sequential core (a group of one) against
   fused groups of K = 4, 8 and 16, each in fp32 and bf16. Variants run interleaved in rounds
   (this machine's speed drifts over minutes), each in a fresh process, and ratios are taken
   within each round.
2. Adam against SGD: seconds per epoch over 15 epochs at batch 64 (denormals flushed, as the
   core runs), epoch by epoch, so a slowdown that grows with training shows.
3. The default study end to end (`sweeps/fashion_mnist.yaml`, its 30 trials x 15 epochs) with
   `fuse: auto`, in a temporary folder: seconds, and the best trial's test accuracy; in fp32
   by one process unless --study says otherwise (bf16:2 = precision bf16, --workers 2;
   fp32:1:8 = `fuse: 8` in the file).

With --results DIR the tables are also written to DIR/bench_sweep.md with the date, commit
and CPU (`make bench`: docs/results).

Usage: python benchmarks/bench_sweep.py [--device cpu|cuda] [--rounds 2] [--skip-study]
       [--ks 1,4,8,16] [--train-images N] [--study fp32:1,bf16:2,fp32:1:8] [--results DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
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
from core_loops import load_fashion_mnist
from cpu import cpu
from optimsweep.core.data import Dataset, prepare_fashion_mnist
from optimsweep.core.train import TrainConfig, default_fuse, fit, fit_group, resolve_precision
from optimsweep.sweep.check import load_spec
from optimsweep.sweep.space import suggest_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = ROOT / "sweeps" / "fashion_mnist.yaml"
OPTIMIZERS = {"sgd": "SGD", "momentum": "momentum SGD", "adam": "Adam"}


def machine(device: torch.device) -> str:
    model, flags = cpu()
    text = (f"CPU: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"flags: {flags}")
    if device.type == "cuda":
        text += f"\nGPU: {torch.cuda.get_device_name(device)}"
    return text + f"\ntorch {torch.__version__}, Python {platform.python_version()}"


def study_configs(n: int, batch_size: int, device: str) -> list[TrainConfig]:
    """n configurations as the default study's sampler would draw them (random phase), at
    one batch size so that they can share batches."""
    spec = load_spec(DEFAULT_STUDY)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    while len(configs) < n:
        config = suggest_config(study.ask(), spec.search_space, spec.base_config())
        config.batch_size, config.epochs, config.device = batch_size, 1, device
        configs.append(config)
    return configs


def trial_epochs_per_second(configs: list[TrainConfig], precision: str, data) -> float:
    for config in configs:
        config.precision = precision
    start = time.perf_counter()
    fit_group(configs, data)  # a member that diverges still trained its epoch: it counts
    return len(configs) / (time.perf_counter() - start)  # evaluation included


def measure_one(k: int, precision: str, device: torch.device, train_images: int | None) -> None:
    """One variant in a process of its own, printing its trial-epochs per second. In one
    long process the sequential core measured up to 1.8x slower right after a K = 16 group
    than at the start (the heap that group left behind), which no sweep of one batch size
    would see: a fresh process per measurement gives every variant the same start."""
    data = load_fashion_mnist(device=device, train_subset=train_images)
    configs = study_configs(k, 64, device.type)
    few = Dataset(*(getattr(data, f)[:640] for f in Dataset._tensor_fields()),
                  num_classes=data.num_classes, split_seed=data.split_seed)
    fit_group([TrainConfig(**vars(c)) for c in configs[:2]], few)  # warm-up: vmap, threads
    print(trial_epochs_per_second(configs, precision, data))


def images(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def fused_table(data, device: torch.device, ks: list[int], rounds: int,
                train_images: int | None) -> results.Table:
    precisions = ["fp32", "bf16"]
    variants = [(k, p) for k in ks for p in precisions]
    rows = []
    print(f"\n1. trial-epochs per second, batch 64, {len(data.train_y)} training images "
          f"(+{len(data.val_y)} validated), default-study configurations; each measurement "
          "in a fresh process")
    print(f"{'round':>5} " + " ".join(f"{f'K={k} {p}':>12}" for k, p in variants))

    def one(k: int, precision: str) -> float:
        args = [sys.executable, __file__, "--one", f"{k},{precision}", "--device", device.type]
        if train_images:
            args += ["--train-images", str(train_images)]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        return float(out.split()[-1])

    for r in range(1, rounds + 1):
        row = {v: one(*v) for v in variants}
        rows.append(row)
        print(f"{r:>5} " + " ".join(f"{row[v]:12.3f}" for v in variants))
    base = (1, "fp32") if 1 in ks else variants[0]
    print(f"\nmedian of per-round ratios against the sequential core ({base[0]} member, "
          f"{base[1]}):")
    cells = {}
    for v in variants:
        ratio = statistics.median(row[v] / row[base] for row in rows)
        median = statistics.median(row[v] for row in rows)
        print(f"  K={v[0]:<3} {v[1]}: {median:7.3f} "
              f"trial-epochs/s  = {ratio:5.2f}x")
        cells[v] = f"{median:.3f} ({ratio:.2f}x)"
    against = ("the sequential core in fp32" if base == (1, "fp32")
               else f"K = {base[0]} in {base[1]}")
    return results.Table(
        [f"trial-epochs per second, {images(len(data.train_y))} images at batch 64, "
         "default-study configs", *precisions],
        [["sequential core (a group of one)" if k == 1 else f"fused, K = {k}",
          *(cells[k, p] for p in precisions)] for k in ks],
        f"Medians of {rounds} interleaved round(s), each measurement in a fresh process; "
        f"ratios taken within each round, against {against}.")


def adam_against_sgd(data, device: torch.device, epochs: int) -> results.Table:
    print(f"\n2. seconds per epoch over {epochs} epochs, batch 64 (training + validation)")
    runs = {}
    for optimizer, lr in (("sgd", 1e-2), ("adam", 7.7e-3)):  # the slow Adam trial
        config = TrainConfig(optimizer=optimizer, lr=lr, batch_size=64, epochs=epochs,
                             device=device.type)
        runs[optimizer] = fit(config, data)
    sgd = [s.seconds for s in runs["sgd"].history]
    adam = [s.seconds for s in runs["adam"].history]
    print("  epoch " + " ".join(f"{e:>5}" for e in range(1, epochs + 1)))
    print("  sgd   " + " ".join(f"{s:5.2f}" for s in sgd))
    print("  adam  " + " ".join(f"{s:5.2f}" for s in adam))
    print(f"  total: sgd {sum(sgd):.1f} s, adam {sum(adam):.1f} s: adam/sgd = "
          f"{sum(adam) / sum(sgd):.2f}x (last epoch {adam[-1] / sgd[-1]:.2f}x); test accuracy "
          f"sgd {runs['sgd'].test_accuracy:.2%}, adam {runs['adam'].test_accuracy:.2%}")
    return results.Table(
        [f"{epochs} epochs at batch 64, training + validation", "SGD", "Adam"],
        [[f"seconds, all {epochs} epochs", f"{sum(sgd):.1f}",
          f"{sum(adam):.1f} ({sum(adam) / sum(sgd):.2f}x SGD; target 1.2x)"],
         ["first / last epoch", f"{sgd[0]:.2f} / {sgd[-1]:.2f}",
          f"{adam[0]:.2f} / {adam[-1]:.2f}"]])


def study_label(precision: str, workers: int, fuse: int | None) -> str:
    """A row of the default-study table: fp32, one process (as shipped); bf16, `--workers 2`."""
    label = f"{precision}, " + ("one process" if workers == 1 else f"`--workers {workers}`")
    if fuse is not None:
        label += f", `fuse: {fuse}`"
    return label + (" (as shipped)" if (precision, workers, fuse) == ("fp32", 1, None) else "")


def best_trial(folder: Path) -> str:
    """The best COMPLETE trial of the study the sweep in `folder` ran (the default journal
    storage there), as the results table shows it."""
    journal = folder / "mlruns" / "optuna.journal"
    if not journal.exists():
        return "-"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=load_spec(DEFAULT_STUDY).name, storage=storage)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return "-"
    best = max(done, key=lambda t: t.value)
    p, test = best.params, best.user_attrs.get("test_accuracy")
    config = ", ".join(filter(None, [
        OPTIMIZERS.get(p.get("optimizer"), p.get("optimizer")),
        "lr " + f"{p['lr']:.1e}".replace("e-0", "e-") if "lr" in p else None,
        f"batch {p['batch_size']}" if "batch_size" in p else None,
        ("no schedule" if p.get("scheduler") == "none" else p.get("scheduler"))]))
    return (f"trial {best.number}, {config}: {best.value:.2%} val"
            + ("" if test is None else f" / {test:.2%} test"))


def default_study(device: torch.device, workers: int = 1, precision: str = "fp32",
                  fuse: int | None = None) -> list[str]:
    """The default study's file as shipped, but for `precision` (added as fixed: where it is
    not fp32) and `fuse` (where given), run by `optimsweep sweep --workers N` in a temporary
    folder. Returns its row of the results table."""
    fused = f"fuse: {fuse}" if fuse is not None else f"fuse: auto = {default_fuse(device)}"
    print(f"\n3. the default study end to end ({DEFAULT_STUDY.name}, {fused}, "
          f"precision {precision}, --workers {workers})")
    row = [study_label(precision, workers, fuse), "failed", "-"]
    with tempfile.TemporaryDirectory() as tmp:
        sweep = DEFAULT_STUDY
        if precision != "fp32" or fuse is not None:
            doc = yaml.safe_load(DEFAULT_STUDY.read_text())
            if precision != "fp32":
                doc.setdefault("fixed", {})["precision"] = precision
            if fuse is not None:
                doc["fuse"] = fuse
            sweep = Path(tmp) / DEFAULT_STUDY.name
            sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "optimsweep.cli", "sweep", str(sweep),
                               "--no-progress", "--timeout", "3600", "--workers", str(workers)],
                              cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(f"  failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            return [row[0], f"failed (exit {done.returncode})", "-"]
        best = subprocess.run([sys.executable, "-m", "optimsweep.cli", "best",
                               str(sweep), "--top", "1"], cwd=tmp,
                              capture_output=True, text=True)
        row[1:] = [f"{seconds:.0f}", best_trial(Path(tmp))]
    print(f"  {seconds:.0f} s for the sweep (process start and data loading included)")
    print("  " + "\n  ".join(best.stdout.strip().splitlines()[:6]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ks", default="1,4,8,16")
    parser.add_argument("--epochs", type=int, default=15, help="for Adam against SGD")
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--only-study", action="store_true", help="skip parts 1 and 2")
    parser.add_argument("--study", default="fp32:1", help="the default study's runs, as "
                        "PRECISION:WORKERS[:FUSE],... (e.g. fp32:1,bf16:2,fp32:1:8)")
    results.option(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # K,precision: one measurement
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        k, precision = args.one.split(",")
        measure_one(int(k), precision, device, args.train_images)
        return
    out = results.Results(args.results, __file__, "bench")
    print(machine(device))
    print(f"precision auto here: {resolve_precision('auto', device)}; fuse auto here: "
          f"{default_fuse(device)}")
    prepare_fashion_mnist()
    data = load_fashion_mnist(device=device, train_subset=args.train_images)
    tables = []
    if not args.only_study:
        tables.append(fused_table(data, device, [int(k) for k in args.ks.split(",")],
                                  args.rounds, args.train_images))
        tables.append(adam_against_sgd(data, device, args.epochs))
    if not args.skip_study:
        rows = []
        for run in args.study.split(","):
            precision, workers, *fuse = run.split(":")
            rows.append(default_study(device, int(workers), precision,
                                      int(fuse[0]) if fuse else None))
        budget = load_spec(DEFAULT_STUDY).budget
        tables.append(results.Table(
            [f"the default study end to end ({budget.n_trials} trials x {budget.epochs} "
             f"epochs, `fuse: auto` = {default_fuse(device)})", "seconds",
             "best trial (selected on validation)"], rows,
            "Seconds from the process start (imports and data loading included)."))
    out.write(tables)


if __name__ == "__main__":
    main()
