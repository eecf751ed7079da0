"""Claiming the budget: which trial runs next, asked from Optuna one at a time under the study
lock, after counting, so concurrent processes never exceed `n_trials`.

Before anything new is sampled: a paused trial that qualifies for promotion (pruner asha),
then each baseline until it has a counted outcome, then the config of an interrupted trial
(a bounded number of times: it never got a verdict), then, for a grid, the first point no
trial covers. Nothing waits in the queue outside the lock, so the only WAITING trials are
paused ones (and queue entries of a process that died inside the lock).
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from optimsweep.errors import StoreError
from optimsweep.records.optuna_adapter import (
    enqueued_params,
    paused_seen_as_pruned,
    start_trial,
    trial_id,
)
from optimsweep.records.schema import (
    INTERRUPTED,
    Attr,
    counted_trials,
    is_paused,
    is_queued,
)
from optimsweep.run.context import OpenStudy
from optimsweep.run.life import close_paused
from optimsweep.run.repair import fail_stale_trials
from optimsweep.sweep.samplers import build_sampler, grid_space, sampler_seed
from optimsweep.sweep.spec import Spec
from optimsweep.util import signals


@dataclass(frozen=True)
class Claim:
    """What a claim got: trials to run now; else `wait` while the budget is held by trials
    running in other processes that may yet fail; else (neither) the budget is used up."""

    trials: tuple[optuna.Trial, ...] = ()
    wait: bool = False

    @property
    def done(self) -> bool:
        return not self.trials and not self.wait


def _given(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's params; an enqueued one has them before it suggests them."""
    return {**enqueued_params(t), **t.params}


def next_enqueued(trials: list, spec: Spec, max_retry: int) -> tuple[dict, dict] | None:
    """What to run before sampling anything new, with the user attrs to give it: each
    baseline until it has a counted outcome (or is running), then the config of an
    interrupted trial. A trial its own process closed on Ctrl-C or SIGTERM was stopped from
    outside (a preemption, a requeue, a user), not by its config: its config runs again
    however often that happens, each time from its checkpoint. Any other interruption (its
    process killed or out of memory, a store failing) counts, at most `max_retry` times."""
    for params in spec.baseline:
        if not any(t.user_attrs.get(Attr.BASELINE) and not t.user_attrs.get(Attr.INTERRUPTED)
                   and all(_given(t).get(k) == v for k, v in params.items()) for t in trials):
            return params, {Attr.BASELINE: True}
    retried = {t.user_attrs.get(Attr.RETRY_OF) for t in trials}
    for t in trials:
        retries = t.user_attrs.get(Attr.RETRIES, 0)
        if (t.user_attrs.get(Attr.INTERRUPTED) and not t.user_attrs.get(Attr.BASELINE)
                and _given(t) and t.number not in retried and retries < max_retry):
            stopped = t.user_attrs.get(Attr.ERROR) == INTERRUPTED
            return _given(t), {Attr.RETRY_OF: t.number,
                               Attr.RETRIES: retries + (0 if stopped else 1)}
    return None


def _uncovered_grid_point(study: optuna.Study, spec: Spec) -> dict | None:
    """The first grid point (in the file's order) that no counted or running trial covers.
    The claim hands grid points out itself: Optuna's grid sampler numbers its points by
    trial number, so a baseline or a retry would make it skip one."""
    covered = [_given(t) for t in counted_trials(study)]
    grid = grid_space(spec.search_space)
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        if not any(params and all(point[k] == v for k, v in params.items() if k in point)
                   for params in covered):
            return point
    return None


def _others_running(opened: OpenStudy, counted: list) -> bool:
    """Counted trials still running in other processes, whose end this process will see:
    they finish, or they are found dead (same host: pid; any host: no heartbeat) and their
    params are retried. Trials of another host without a heartbeat can't be watched."""
    running = [t for t in counted if t.state == TrialState.RUNNING]
    return bool(running) and (opened.storage.heartbeat_enabled or all(
        t.user_attrs.get(Attr.HOST) == socket.gethostname() for t in running))


def _seeded_sampler(spec: Spec, n_trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sampler for the next trial: seeded by trial number, so that processes sampling
    one after another never repeat each other, and one process alone is reproducible. QMC
    and grid keep one seed: their sequence is shared through the study."""
    name = spec.sampler.get("name")
    seed = spec.seed if name in ("grid", "qmc") else sampler_seed(spec.seed, n_trials_so_far)
    return build_sampler(spec.sampler, seed=seed,
                         grid=grid_space(spec.search_space) if name == "grid" else None)


def claim_trial(opened: OpenStudy) -> Claim:
    """Under the study lock: check the journal is still the one opened, close trials of
    ended processes, then promote a paused trial that qualifies (pruner asha: promotions
    cost epochs, not budget), else, if the budget has room, ask Optuna for the next trial.
    Once nothing can run any more, trials still paused are closed as pruned. Signals wait
    until the trial says which process owns it. Inside the lock no call is retried: the
    lock lives on a database connection, and a lost connection loses it."""
    study, storage, spec = opened.study, opened.storage, opened.spec
    signals.check()
    with opened.lock():
        storage.check_intact()  # a journal deleted or replaced since: stop, write nothing
        fail_stale_trials(opened)
        trials = study.get_trials(deepcopy=False)
        waiting = spec.asha.promotable(trials, spec.maximize) if spec.asha else None
        pending = None
        if waiting is None:
            counted = counted_trials(study)
            if len(counted) >= opened.ref.n_trials:
                if _others_running(opened, counted):
                    return Claim(wait=True)
                # Cut short (--n-trials below the file's): the paused trials wait for the
                # next sweep, unless none is complete; then the leader goes on, so that
                # every sweep ends with a winner to export. At the study's end nothing can
                # promote them any more: the leader goes on, the others are closed.
                cut_short = opened.ref.n_trials < spec.budget.n_trials
                if cut_short and (not spec.asha or any(
                        t.state == TrialState.COMPLETE for t in trials)):
                    return Claim()
                waiting = spec.asha.leader(trials, spec.maximize) if spec.asha else None
                if waiting is None:
                    if not cut_short:
                        close_paused(opened)
                    return Claim()
                storage.call(storage.optuna.set_trial_user_attr, trial_id(waiting),
                             Attr.LEADER, True, retry=False)
            else:
                waiting = next((t for t in trials if is_queued(t)), None)
            if waiting is None:
                pending = next_enqueued(trials, spec, storage.resilience.max_retry)
                if pending is None and spec.sampler.get("name") == "grid":
                    point = _uncovered_grid_point(study, spec)
                    if point is None:
                        return Claim(wait=_others_running(opened, counted))
                    pending = (point, {})
        study.sampler = _seeded_sampler(spec, len(trials))
        if spec.asha:
            study.sampler = paused_seen_as_pruned(study.sampler)
        with signals.held():
            if pending is not None:
                storage.call(study.enqueue_trial, pending[0], user_attrs=pending[1],
                             retry=False)
                waiting = next(t for t in reversed(study.get_trials(deepcopy=False))
                               if is_queued(t))
            if waiting is not None and is_paused(waiting):  # its owner named before it runs:
                for key, value in ((Attr.HOST, socket.gethostname()), (Attr.PID, os.getpid())):
                    storage.call(storage.optuna.set_trial_user_attr, trial_id(waiting), key,
                                 value, retry=False)  # a promotion cut short is then stale
            trial = storage.call(start_trial, study, waiting, retry=False)
            if trial is None:  # only another process outside the lock could have
                raise StoreError(f"study storage: trial {waiting.number} was started by "
                                 "a process that did not hold the study lock")
            storage.first_beat(trial_id(trial))
            storage.call(trial.set_user_attr, Attr.HOST, socket.gethostname(), retry=False)
            storage.call(trial.set_user_attr, Attr.PID, os.getpid(), retry=False)
            if waiting is not None and is_paused(waiting):
                storage.call(trial.set_user_attr, Attr.PAUSED_AT, None, retry=False)
                storage.call(trial.set_user_attr, Attr.PROMOTIONS,
                             waiting.user_attrs.get(Attr.PROMOTIONS, 0) + 1, retry=False)
            opened.live.add(trial_id(trial))  # the trial's life lets go of it
    opened.tracker.reopen(opened.ref.parent_run_id)  # another process may have closed it
    return Claim(trials=(trial,))


def claim(opened: OpenStudy, k: int) -> Claim:
    """Up to `k` trials, claimed one by one (each under the lock, so the budget holds)."""
    trials: list[optuna.Trial] = []
    try:
        while len(trials) < k:
            got = claim_trial(opened)
            if not got.trials:
                return Claim(tuple(trials)) if trials else got
            trials += got.trials
    except BaseException:
        for trial in trials:  # never to run: the repair fails them as this process's
            opened.live.discard(trial_id(trial))
        raise
    return Claim(tuple(trials))
