"""`optimsweep sweep`: open (or resume) the study, run its trials in this process or in
worker processes, and close the study's run however the sweep ends."""

from __future__ import annotations

import logging
import os
import time

import optuna
import torch

from optimsweep.core.data import TASKS
from optimsweep.errors import SpecError, StoreError, describe
from optimsweep.run.loop import run_loop
from optimsweep.run.placement import VISIBLE, place, visible_devices
from optimsweep.run.progress import say
from optimsweep.run.study import close_study_run, load_sweep_data, open_study
from optimsweep.run.workers import run_workers
from optimsweep.sweep.spec import Spec
from optimsweep.util.urls import redact

log = logging.getLogger("optimsweep")


def run_sweep(spec: Spec, *, n_trials: int | None = None, timeout: float | None = None,
              workers: int | str | None = 1, gpus_per_worker: int | None = None,
              progress: bool = True) -> optuna.Study:
    """Run (or resume) the study up to its total trial budget; returns the study. `workers`:
    a count, `auto` (one per visible GPU, or per `gpus_per_worker` of them) or None (auto
    where more than one GPU is visible, else 1)."""
    for flag, value, ok in (("--n-trials", n_trials, n_trials is None or n_trials >= 1),
                            ("--timeout", timeout, timeout is None or timeout > 0)):
        if not ok:
            raise SpecError(f"{flag}: {value} must be {'> 0' if flag == '--timeout' else '>= 1'}")
    visible = visible_devices(dict(os.environ), torch.cuda.device_count)
    placements = place(workers, gpus_per_worker, visible)
    if visible and not torch.cuda.is_available():
        log.warning(f"{VISIBLE} lists {len(visible)} devices but torch finds no CUDA here: "
                    f"the {len(placements)} workers train on the CPU")
    in_process = len(placements) == 1 and placements[0].devices in (
        (), tuple(visible), tuple(visible[:1]))  # it sees what it would be given
    if not in_process and visible:
        say(f"{len(placements)} workers; the devices each sees ({VISIBLE}): "
            + " | ".join(",".join(p.devices) for p in placements))
    timeout = timeout or spec.budget.timeout
    # Before the study exists: a data factory that fails leaves nothing behind. Workers
    # load their own copy from the import strings; the user's data is checked here too.
    data = load_sweep_data(spec) if in_process or spec.task not in TASKS else None
    deadline = time.time() + timeout if timeout else None
    opened = open_study(spec, workers=len(placements), n_trials=n_trials)
    status = "FINISHED"
    try:
        if in_process:
            run_loop(opened, data, deadline=deadline, progress=progress)
        else:
            run_workers(opened, placements, deadline, progress)
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
