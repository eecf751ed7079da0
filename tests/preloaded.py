"""Imported once by the fork server the tests start `optimsweep` processes from (records.py):
what a sweep pays the first time it opens MLflow's SQL store, builds an optimizer (torch's
compiler), loads FashionMNIST (torchvision) and closes its study (matplotlib, plotly's figure
classes, Optuna's importance evaluator) is paid there once, not by every process. Nothing
here opens a store or a file that a process would inherit."""

import gc
import warnings

import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import optuna
import sqlalchemy.orm
import torch
import torchvision.datasets  # noqa: F401

from optimsweep.plots import write_study_plots


def _warm() -> None:
    import tempfile
    from pathlib import Path

    sqlalchemy.orm.configure_mappers()  # what the first query of MLflow's store does
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_study_plots(study, "val_loss", Path(folder))
    optuna.logging.set_verbosity(verbosity)


_warm()

# Everything imported so far lives as long as the server and each forked child: out of the
# collector's sight, a child's first full collection no longer walks (and copies, page by
# page) the whole inherited heap, about half a CPU second a child.
gc.freeze()
