"""This process's share of a sweep: claim trials and live them, until the budget is used up
or the deadline passes."""

from __future__ import annotations

import contextlib
import logging
import time

from optimsweep.core.train import default_fuse
from optimsweep.records.schema import State
from optimsweep.run.claim import claim
from optimsweep.run.context import OpenStudy
from optimsweep.run.life import run_trials
from optimsweep.run.progress import Progress, say
from optimsweep.run.repair import close_unstarted
from optimsweep.util import signals

log = logging.getLogger("optimsweep")


def run_loop(opened: OpenStudy, data, *, deadline: float | None = None,
             progress: bool = False) -> None:
    """Claim and run trials (`fuse` at a time) until the budget is used up or the deadline
    (time.time()) passes. While the budget is held by trials running in other processes,
    wait for them: one may fail and leave its place."""
    spec = opened.spec
    fuse = default_fuse(data.device) if spec.fuse == "auto" else spec.fuse
    bar = Progress(opened.study, spec.name, opened.ref.n_trials, spec.budget) \
        if progress else None
    try:
        while deadline is None or time.time() < deadline:
            got = claim(opened, fuse)
            if got.done:
                break
            if got.wait:
                time.sleep(min(2.0, opened.storage.resilience.heartbeat_interval))
                continue
            for trial, outcome in zip(got.trials, run_trials(opened, got.trials, data,
                                                             bar.tick if bar else None),
                                      strict=True):
                if outcome.taken:  # nothing of it is ours to record any more
                    log.warning(outcome.taken)
                elif outcome.state == State.FAILED:
                    say(f"trial {trial.number} failed: {outcome.error}")
                elif outcome.state == State.PAUSED:
                    epoch = outcome.paused_at / spec.budget.reports_per_epoch
                    say(f"trial {trial.number}: paused at epoch {epoch:g}: not in the top "
                        f"1/{spec.asha.reduction_factor} of its rung for now")
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:
        # A signal between a claim and the trial's run: the trial is this process's to close
        with contextlib.suppress(Exception), signals.held(), opened.lock():
            close_unstarted(opened)
        raise
    finally:
        if bar is not None:
            bar.close()
