"""The progress bar of a sweep: the budget used, the best trial so far, each running trial's
epoch (a long trial is visibly alive), and what successive halving did (paused, promoted,
stopped)."""

from __future__ import annotations

import logging
import sys
import time

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from optimsweep.records.schema import Attr, counted_trials, is_paused
from optimsweep.sweep.spec import Budget

log = logging.getLogger("optimsweep")
TICK_SECONDS = 1.0  # the most often a report redraws the line (each redraw reads the study)


def say(message: str) -> None:
    """A line that does not tear the progress bar."""
    tqdm.write(message, file=sys.stderr)


def scheduler_counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """How many trials are paused now, promotions so far, and trials stopped (pruned)."""
    return {"paused": sum(is_paused(t) for t in trials),
            "promoted": sum(t.user_attrs.get(Attr.PROMOTIONS, 0) for t in trials),
            "stopped": sum(t.state == TrialState.PRUNED for t in trials)}


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The counted trials that have their verdict (not running, not paused at a rung)."""
    return [t for t in counted_trials(study) if t.state.is_finished()]


class Progress:
    def __init__(self, study: optuna.Study, name: str, n_trials: int, budget: Budget):
        self.study = study
        self.budget = budget
        self.start = len(_finished(study))
        self.bar = tqdm(total=max(0, n_trials - self.start), desc=name, unit="trial",
                        file=sys.stderr)
        self._drawn = 0.0

    def tick(self) -> None:
        """A trial reported: redraw, at most every TICK_SECONDS. A store that fails here is
        the next write's to report, not the trial's failure."""
        if time.monotonic() - self._drawn < TICK_SECONDS:
            return
        try:
            self.update()
        except Exception as exc:  # noqa: BLE001
            log.debug(f"progress line not redrawn: {exc}")

    def update(self) -> None:
        self._drawn = time.monotonic()
        study, bar = self.study, self.bar
        # what is done, not what is claimed: a running trial shows beside it, by epoch
        bar.n = min(bar.total, len(_finished(study)) - self.start)
        trials = study.get_trials(deepcopy=False)
        parts = []
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = study.best_trial
            parts.append(f"best: trial {best.number} = {best.value:.4f}")
        per_epoch = self.budget.reports_per_epoch
        running = [f"{t.number} (epoch {max(t.intermediate_values, default=0) / per_epoch:g}"
                   f"/{self.budget.epochs})" for t in trials if t.state == TrialState.RUNNING]
        if running:
            parts.append(f"running: {', '.join(running[:4])}"
                         + (f" +{len(running) - 4}" if len(running) > 4 else ""))
        counts = scheduler_counts(trials)
        if any(counts.values()):
            parts.append(", ".join(f"{v} {k}" for k, v in counts.items()))
        bar.set_postfix_str(" · ".join(parts), refresh=False)
        bar.refresh()

    def close(self) -> None:
        self.bar.close()
