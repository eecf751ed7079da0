"""Every private Optuna name the project touches, in one place, each with why.

Trials here are asked and told (not run by `optimize`), so the heartbeat, the stale-trial
check and a study's storage are reached from outside the API Optuna documents. When Optuna
changes one of these, this is the only file to change.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled as _is_heartbeat_enabled
from optuna.storages.journal._file import BaseJournalFileLock

__all__ = ["BaseJournalFileLock", "contains", "enqueued_params", "heartbeat_enabled",
           "never_stops", "stale_trial_ids", "start_trial", "storage_of", "trial_id"]

# Our claim and trial loop drive the heartbeat themselves (see records.storage.heartbeat).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (Optuna keeps it private)."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's id in its storage: unique across studies, unlike its number."""
    return trial._trial_id


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    """True for an RDB storage created with a heartbeat interval (server databases here)."""
    return _is_heartbeat_enabled(storage)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of RUNNING trials whose heartbeat is older than the storage's grace period."""
    return study._storage._get_stale_trial_ids(study._study_id)


def contains(distribution: optuna.distributions.BaseDistribution, value) -> bool:
    """True when `value` (an external value, as a sweep file gives it) lies in the
    distribution."""
    return distribution._contains(distribution.to_internal_repr(value))


def never_stops(study: optuna.Study) -> optuna.Study:
    """A grid sampler calls `study.stop()` once it has handed out every point; here the
    budget ends a study, and the claim hands grid points out itself."""
    study.stop = lambda: None
    return study


def enqueued_params(trial: optuna.trial.FrozenTrial) -> dict:
    """The params `enqueue_trial` gave a trial: it holds them before it suggests them."""
    return trial.system_attrs.get("fixed_params", {})


def start_trial(study: optuna.Study, waiting: optuna.trial.FrozenTrial | None = None
                ) -> optuna.Trial | None:
    """`study.ask()` without its queue: start the WAITING trial `waiting` (a queue entry or
    a paused trial, chosen by the claim), or a new one. `ask` would take the oldest WAITING
    trial, and paused trials wait too. None when another process started `waiting` first."""
    storage = study._storage
    study._thread_local.cached_all_trials = None  # as `ask` does: the sampler sees every trial
    if waiting is None:
        tid = storage.create_new_trial(study._study_id)
    else:
        tid = waiting._trial_id
        if not storage.set_trial_state_values(tid, optuna.trial.TrialState.RUNNING):
            return None
    return optuna.Trial(study, tid)
