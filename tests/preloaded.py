"""Imported once by the fork server the tests start `optimsweep` processes from (records.py):
what a sweep pays the first time it loads FashionMNIST (torchvision) and closes its study
(matplotlib, plotly's figure classes, Optuna's importance evaluator) is paid there once,
not by every process."""

import warnings

import optuna
import torchvision.datasets  # noqa: F401

from optimsweep.plots import write_study_plots


def _warm() -> None:
    import tempfile
    from pathlib import Path

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_study_plots(study, "val_loss", Path(folder))


_warm()
