"""Every private Optuna name the project touches, in one place, each with why.

Trials here are asked and told (not run by `optimize`), so the heartbeat, the stale-trial
check and a study's storage are reached from outside the API Optuna documents. When Optuna
changes one of these, this is the only file to change.
"""

from __future__ import annotations

import copy
import warnings

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled as _is_heartbeat_enabled
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import TrialState

from optimsweep.records.schema import is_paused

__all__ = ["BaseJournalFileLock", "contains", "enqueued_params", "heartbeat_enabled",
           "never_stops", "paused_seen_as_pruned", "stale_trial_ids", "start_trial",
           "storage_of", "trial_id"]

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


class _PausedShownPruned:
    """A study as its sampler sees it: a paused trial (WAITING, which samplers skip) shows
    as PRUNED at its rung, as the stopping form would have left it. Samplers read trials
    through `_get_trials`; everything else is the study's own."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        shown = []
        for trial in self._study._get_trials(deepcopy=False, use_cache=use_cache):
            if is_paused(trial):
                trial = copy.copy(trial)
                trial.state = TrialState.PRUNED
            if states is None or trial.state in states:
                shown.append(trial)
        return shown

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy, states)


class _SeesPaused(optuna.samplers.BaseSampler):
    def __init__(self, sampler: optuna.samplers.BaseSampler):
        self.sampler = sampler

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(_PausedShownPruned(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(_PausedShownPruned(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(_PausedShownPruned(study), trial, param_name,
                                               param_distribution)

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(_PausedShownPruned(study), trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(_PausedShownPruned(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def paused_seen_as_pruned(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """`sampler`, learning from paused trials as from pruned ones (their intermediate values
    up to the rung): without it TPE would model a study under successive halving with
    promotion from its few finished trials alone, most being paused most of the time."""
    return _SeesPaused(sampler)
