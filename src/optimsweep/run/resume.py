"""Where an interrupted training goes on from: the latest checkpoint that continues it, found
with the runs of the trials it retries (or the confirm runs of the same trial and seed),
through the tracking store, so a worker on any host finds it.

An interrupted trial is closed failed and interrupted (its run too: nothing stays RUNNING
once its process is gone), and the claim runs its config again as a new trial that says
which trial it retries. That retry continues from the checkpoint: its run's curve starts with
the epochs the checkpoint holds (each once), its Optuna trial gets their intermediate values,
and both say where they went on from (`resumed_from`). A checkpoint that can't be used (torn,
from another config, precision or version of the training code, tampered) is refused with
one `note:` line; the next older one is tried, else training starts from epoch 0.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from optimsweep.core import checkpoint, train
from optimsweep.core.checkpoint import Checkpointer, TrainingState
from optimsweep.core.train import EpochStats, TrainConfig
from optimsweep.errors import StoreError
from optimsweep.records.schema import Attr, Tag
from optimsweep.records.tracking import Tracker
from optimsweep.run.progress import say

log = logging.getLogger("optimsweep")


@dataclass
class Found:
    """A checkpoint to go on from: its state, and the run (and trial) that wrote it."""

    state: TrainingState
    run_id: str
    trial: int | None = None

    @property
    def where(self) -> str:
        return f"trial {self.trial}" if self.trial is not None else f"run {self.run_id}"


def latest(tracker: Tracker, runs: list[tuple[str, int | None]], config: TrainConfig,
           what: str, reports_per_epoch: int = 1) -> Found | None:
    """The newest usable checkpoint of `runs` ((run id, trial number), searched in order,
    each run's newest first) for `config`; a refused one gets a note naming `what` (the
    trial or confirm run that looked)."""
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, trial in runs:
            for name in tracker.checkpoints(run_id):
                folder = Path(tmp) / run_id
                try:
                    path = tracker.download(run_id, name, folder)
                    return Found(train.load_checkpoint(path, config, reports_per_epoch),
                                 run_id, trial)
                except checkpoint.Refused as exc:
                    log.warning(f"{what}: checkpoint {name} of run {run_id} refused: {exc}; "
                                "not resumed from it")
    return None


def continue_run(tracker: Tracker, run_id: str, found: Found, what: str,
                 epochs: int) -> list[EpochStats]:
    """The run goes on from `found`: one line says so, the run says where it went on from
    and gets the curve so far. Returns that curve."""
    epoch = f"{found.state.epoch / found.state.reports_per_epoch:g}"
    say(f"{what}: resumed at epoch {epoch} of {epochs} (from the checkpoint of "
        f"{found.where})")
    history = [EpochStats(**stats) for stats in found.state.history]
    # The tag first: whoever reads the run sees the inherited curve only with the tag that
    # says it is inherited, never as epochs this run trained.
    tracker.set_tag(run_id, Tag.RESUMED_FROM, f"{found.where} epoch {epoch}")
    tracker.log_epochs(run_id, history)
    return history


def retried_runs(study: optuna.Study, trial: optuna.Trial) -> list[tuple[str, int]]:
    """The runs of the trials `trial` runs again, nearest first: it retries one, which may
    have retried another (each may hold the newest checkpoint)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    runs, number, seen = [], trial.user_attrs.get(Attr.RETRY_OF), set()
    while number is not None and number in trials and number not in seen:
        seen.add(number)
        earlier = trials[number]
        if earlier.user_attrs.get(Attr.RUN_ID):
            runs.append((earlier.user_attrs[Attr.RUN_ID], number))
        number = earlier.user_attrs.get(Attr.RETRY_OF)
    return runs


def checkpointer(tracker: Tracker, run_id: str, every: float | str | None,
                 still_ours: Callable[[], None] | None = None) -> Checkpointer | None:
    """Where a run's checkpoints go: with the run, in the tracking store; `still_ours()`
    raises when the run is no longer this process's to write (a trial taken by another)."""
    if every is None:
        return None

    def sink(path: Path, epoch: int) -> None:
        if still_ours is not None:
            still_ours()
        tracker.log_checkpoint(run_id, path, epoch)

    return Checkpointer(sink, every)


def describe_writes(writer: Checkpointer | None, seconds: float) -> str | None:
    """"3 writes, 0.41 s (0.6% of training)": the run's tag, or None with no checkpoints."""
    if writer is None or not writer.writes:
        return None
    share = writer.write_seconds / seconds if seconds > 0 else 0.0
    return f"{writer.writes} writes, {writer.write_seconds:.2f} s ({share:.1%} of training)"


def drop(tracker: Tracker, run_ids: list[str]) -> None:
    """Remove the checkpoints of finished work (its final state_dict stays). A store that
    fails here only leaves files behind; the records are already right."""
    for run_id in run_ids:
        try:
            tracker.delete_checkpoints(run_id)
        except StoreError as exc:
            log.warning(f"run {run_id}: its checkpoints could not be removed ({exc})")
