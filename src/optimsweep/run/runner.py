"""`optimsweep sweep`: open (or resume) the study, run its trials in this process or in
worker processes, and close the study's run however the sweep ends."""

from __future__ import annotations

import time

import optuna

from optimsweep.core.data import TASKS
from optimsweep.errors import SpecError, StoreError, describe
from optimsweep.run.loop import run_loop
from optimsweep.run.study import close_study_run, load_sweep_data, open_study
from optimsweep.run.workers import run_workers
from optimsweep.sweep.spec import Spec
from optimsweep.util.urls import redact


def run_sweep(spec: Spec, *, n_trials: int | None = None, timeout: float | None = None,
              workers: int = 1, progress: bool = True) -> optuna.Study:
    """Run (or resume) the study up to its total trial budget; returns the study."""
    for flag, value, ok in (("--n-trials", n_trials, n_trials is None or n_trials >= 1),
                            ("--timeout", timeout, timeout is None or timeout > 0),
                            ("--workers", workers, workers >= 1)):
        if not ok:
            raise SpecError(f"{flag}: {value} must be {'> 0' if flag == '--timeout' else '>= 1'}")
    timeout = timeout or spec.budget.timeout
    # Before the study exists: a data factory that fails leaves nothing behind. Workers
    # load their own copy from the import strings; the user's data is checked here too.
    data = load_sweep_data(spec) if workers == 1 or spec.task not in TASKS else None
    deadline = time.time() + timeout if timeout else None
    opened = open_study(spec, workers=workers, n_trials=n_trials)
    status = "FINISHED"
    try:
        if workers == 1:
            run_loop(opened, data, deadline=deadline, progress=progress)
        else:
            run_workers(opened, workers, deadline, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            close_study_run(opened, status)
        except Exception as exc:
            if status == "FINISHED":  # else the error that stopped the sweep says more
                raise exc if isinstance(exc, StoreError) else StoreError(
                    f"tracking store {redact(opened.tracker.uri)}: {describe(exc)}") from exc
    return opened.study
