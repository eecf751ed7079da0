"""The progress bar of a sweep: the budget used, and the best trial so far."""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from optimsweep.records.schema import counted_trials


def say(message: str) -> None:
    """A line that does not tear the progress bar."""
    tqdm.write(message, file=sys.stderr)


class Progress:
    def __init__(self, study: optuna.Study, name: str, n_trials: int):
        self.study = study
        self.start = len(counted_trials(study))
        self.bar = tqdm(total=max(0, n_trials - self.start), desc=name, unit="trial",
                        file=sys.stderr)

    def update(self) -> None:
        study, bar = self.study, self.bar
        bar.n = min(bar.total, len(counted_trials(study)) - self.start)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial
            bar.set_postfix_str(f"best: trial {best.number} = {best.value:.4f}")
        bar.refresh()

    def close(self) -> None:
        self.bar.close()
