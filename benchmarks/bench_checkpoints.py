"""What checkpoints cost a trial (`make bench`, after bench_sweep.py). Side by side in one run.

One trial of the default study (`sweeps/fashion_mnist.yaml`: the tutorial MLP, 50k training
images, 10k validated each epoch, its base config and baseline at batch 64, with Adam and a
cosine schedule as its best trials have: Adam's two moment buffers make the largest
checkpoint of its search space) is trained three ways:

  none   no checkpoints;
  auto   `checkpoint: {every: auto}`, the sweep files' default: writes spaced by their
         measured cost so that writing takes at most AUTO_SHARE (2%) of the training time;
  each   `checkpoint: {every: 0}`: a write at the end of every epoch but the last.

Checkpoints go where a sweep puts them: `Tracker.log_checkpoint` into the trial's MLflow run
(a SQLite store with its artifacts, in a temporary folder), which stores the new file and
deletes the older ones. Epoch metrics and the rest of a trial's records are left out of all
three. The variants run alternately (none, auto, each, none, ...) in one process after a
warm-up that writes a checkpoint once (MLflow's first artifact call imports its modules),
so a slow phase of the machine hits all three alike. Printed: each round's trial seconds;
medians of trial seconds, of the Checkpointer's write count and write seconds (capturing
included), of write seconds / training seconds (training + validation, what the run's
`checkpoints` tag reports) and of each round's wall ratio against no checkpoints; the size
of the checkpoint file the store kept. The write share is measured within each trial; the
wall ratios also carry whatever else the machine runs, which on a shared machine can swamp a
cost of 1%.

With --results DIR the table is also written to DIR/bench_checkpoints.md with the date,
commit and CPU (`make bench`, `make bench-checkpoints`: docs/results).

Usage: python benchmarks/bench_checkpoints.py [--device cpu|cuda] [--rounds 3]
       [--epochs 15] [--train-images N] [--results DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import results
from bench_sweep import DEFAULT_STUDY, images, machine
from core_loops import load_fashion_mnist
from optimsweep.core.checkpoint import AUTO_SHARE
from optimsweep.core.data import Dataset, prepare_fashion_mnist
from optimsweep.core.train import TrainConfig, fit
from optimsweep.records.schema import CHECKPOINT_DIR
from optimsweep.records.tracking import Tracker
from optimsweep.run import resume
from optimsweep.sweep.check import load_spec

VARIANTS = {"none": None, "auto": "auto", "each": 0.0}  # name: checkpoint.every
NAMES = {"none": "no checkpoints", "auto": "every: auto", "each": "every: 0 (each epoch)"}
LABELS = {"none": "no checkpoints", "auto": "`every: auto` (default)",
          "each": "`every: 0` (each epoch)"}


def trial_config(epochs: int, device: str) -> TrainConfig:
    """The default study's baseline with Adam and a cosine schedule, as its best trials."""
    spec = load_spec(DEFAULT_STUDY)
    values = {**spec.base_config(), **spec.baseline[0], "optimizer": "adam", "lr": 6.9e-4,
              "scheduler": "cosine", "epochs": epochs, "device": device, "precision": "fp32"}
    return TrainConfig(**values)


class Runs:
    """A trial's MLflow runs in a SQLite store of its own, as a sweep's records hold them."""

    def __init__(self, folder: Path):
        self.tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
        self.experiment = self.tracker.experiment_id("checkpoint-bench")
        self.parent = self.tracker.client.create_run(self.experiment,
                                                     run_name="study").info.run_id
        self.count = 0

    def new(self) -> str:
        self.count += 1
        return self.tracker.start_run(self.experiment, self.parent, "checkpoint-bench",
                                      self.count)

    def kept(self, run_id: str) -> list[int]:
        """The sizes in bytes of the checkpoint files the run holds."""
        found = self.tracker.client.list_artifacts(run_id, CHECKPOINT_DIR)
        return [f.file_size for f in found if not f.is_dir]


def one_trial(config: TrainConfig, data, every, runs: Runs) -> dict:
    writer, run_id = None, None
    if every is not None:
        run_id = runs.new()
        writer = resume.checkpointer(runs.tracker, run_id, every)  # as a sweep's trial
    start = time.perf_counter()
    result = fit(config, data, checkpointer=writer)
    wall = time.perf_counter() - start
    trained = sum(s.seconds for s in result.history)  # training + validation
    out = {"wall": wall, "trained": trained, "writes": 0, "write_s": 0.0, "sizes": []}
    if writer is not None:
        out.update(writes=writer.writes, write_s=writer.write_seconds, sizes=runs.kept(run_id))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="per trial (the study's: 15)")
    parser.add_argument("--train-images", type=int, default=None)
    results.option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    out = results.Results(args.results, __file__, "bench-checkpoints")
    print(machine(device))
    prepare_fashion_mnist()
    data = load_fashion_mnist(device=device, train_subset=args.train_images)
    config = trial_config(args.epochs, device.type)
    study_epochs = load_spec(DEFAULT_STUDY).base_config()["epochs"]
    print(f"\ncheckpoint overhead of one default-study trial: {config.optimizer} lr "
          f"{config.lr:g}, {config.scheduler} schedule, batch {config.batch_size}, "
          f"{config.precision}; {len(data.train_y)} training images (+{len(data.val_y)} "
          f"validated), {config.epochs} epochs"
          + ("" if config.epochs == study_epochs else
             f" (fewer than the study's {study_epochs})" if config.epochs < study_epochs
             else f" (the study's: {study_epochs})"))
    print("checkpoints into the trial's MLflow run (SQLite store, artifacts in a temporary "
          "folder) through Tracker.log_checkpoint; none after the last epoch")
    few = Dataset(*(getattr(data, f)[:640] for f in Dataset._tensor_fields()),
                  num_classes=data.num_classes, split_seed=data.split_seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Runs(Path(tmp))
        warm = TrainConfig(**{**vars(config), "epochs": 2})
        one_trial(warm, few, 0.0, runs)  # warm-up: threads, MLflow's artifact modules
        print(f"\n{'round':>5} " + " ".join(f"{NAMES[v] + ' s':>22}" for v in VARIANTS)
              + "   (writes, write s)")
        for r in range(1, args.rounds + 1):
            row = {name: one_trial(config, data, every, runs)
                   for name, every in VARIANTS.items()}
            rows.append(row)
            print(f"{r:>5} " + " ".join(
                f"{row[v]['wall']:9.2f}" + (f" ({row[v]['writes']:2d}, "
                                            f"{row[v]['write_s']:5.2f})" if v != "none"
                                            else " " * 13) for v in VARIANTS))
    sizes = [s for row in rows for v in VARIANTS for s in row[v]["sizes"]]
    kept = {len(row[v]["sizes"]) for row in rows for v in VARIANTS if row[v]["writes"]}

    def median(v: str, f) -> float:
        return statistics.median(f(row[v], row) for row in rows)

    print(f"\nmedians of {args.rounds} round(s), alternated:")
    shares, table = {}, []
    met = None
    for v in VARIANTS:
        wall = median(v, lambda m, _: m["wall"])
        line = (f"  {NAMES[v]:<22} {wall:7.2f} s per trial "
                f"(training + validation {median(v, lambda m, _: m['trained']):.2f} s)")
        cells = [LABELS[v], f"{wall:.1f}", "-", "-", "-", "1.00x"]
        if v != "none":
            shares[v] = median(v, lambda m, _: m["write_s"] / m["trained"])
            ratio = median(v, lambda m, row: m["wall"] / row["none"]["wall"])
            writes, write_s = (median(v, lambda m, _: m["writes"]),
                               median(v, lambda m, _: m["write_s"]))
            line += (f"; {writes:g} writes, "
                     f"{write_s:.3f} s = {shares[v]:.2%} of "
                     f"training; wall {ratio:.3f}x no checkpoints")
            share = f"{shares[v]:.2%}"
            if v == "auto":
                met = "met" if shares["auto"] <= AUTO_SHARE else "MISSED"
                share += f" (target {AUTO_SHARE:.0%}: {met})"
            cells[2:] = [f"{writes:g}", f"{write_s:.2f}", share, f"{ratio:.2f}x"]
        print(line)
        table.append(cells)
    if sizes:
        size = (f"{statistics.median(sizes) / 1e6:.2f} MB; files kept per "
                f"run: {', '.join(map(str, sorted(kept)))}")
    else:
        size = "none written"
    print(f"checkpoint file: {size}")
    print(f"target: every: auto writes in at most {AUTO_SHARE:.0%} of a trial's training "
          f"time: {met} ({shares['auto']:.2%})")
    out.write([results.Table(
        [f"one {config.epochs}-epoch trial, medians of {args.rounds} rounds", "trial s",
         "writes", "write s (capture included)", "share of training", "wall vs none"], table,
        f"One default-study trial ({config.optimizer} lr {config.lr:g}, {config.scheduler} "
        f"schedule, batch {config.batch_size}, {config.precision}; "
        f"{images(len(data.train_y))} training images, {images(len(data.val_y))} validated "
        "each epoch), checkpoints into its MLflow run (SQLite store), variants alternated.")],
        [f"The checkpoint file: {size}."])


if __name__ == "__main__":
    main()
