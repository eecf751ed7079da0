"""One owner of a trial's life, and of every run it starts: suggest, start the run, fit, log,
then close the Optuna trial and the MLflow run in the same state, however it ends.

The rule that keeps Optuna and MLflow 1:1: a run is closed only after its trial is told, so
Optuna is always the source of truth; and a trial is told only once its run exists, so no
finished trial lacks a run. Whatever a crash leaves in between (a RUNNING trial of a dead
process, a run still RUNNING) `reconcile` closes from Optuna's side the next time any
command opens the study.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from optimsweep.core import train
from optimsweep.core.train import DivergedError, TrainConfig
from optimsweep.records.storage import (
    RESILIENCE,
    StoreError,
    describe,
    heartbeat,
    is_heartbeat_enabled,
    storage_call,
)
from optimsweep.records.tracking import HOST, PID, RUN_STATUS, STATE, TRIAL, Tracker
from optimsweep.util import signals

if TYPE_CHECKING:
    from optimsweep.run.study import StudyContext

# Trials this process has claimed and not yet closed (by storage id): a RUNNING trial that
# names this process but is not here was left behind by an earlier command in it.
LIVE: set[int] = set()
INTERRUPTED = "interrupted: Ctrl-C or SIGTERM"
STATE_OF = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
            "failed": TrialState.FAIL}


@dataclass
class Outcome:
    """How a trial (or a confirm run) ended. `counted` is False when the trial could not
    give its config a verdict (interrupted, a store failed): it does not use up budget."""

    state: str = "failed"
    value: float | None = None
    error: str | None = INTERRUPTED
    traceback: str | None = None
    counted: bool = False
    test_accuracy: float | None = None
    run_id: str | None = None  # its MLflow run, once created

    def end(self, **how) -> None:
        """Record how it ended; what `how` leaves out takes the defaults above (failed,
        interrupted, not counted)."""
        vars(self).update(vars(Outcome(**how, run_id=self.run_id)))


def _record_failure(outcome: Outcome, exc: BaseException) -> bool:
    """Record how `exc` ended a trial or run; True when it must go on up and stop the sweep
    (Ctrl-C/SIGTERM, a store failure). Anything else is the trial's own failure: counted,
    with its traceback."""
    if isinstance(exc, KeyboardInterrupt):
        outcome.end()  # failed, interrupted, not counted
        return True
    if isinstance(exc, StoreError):
        outcome.end(error=str(exc))
        return True
    outcome.end(error=describe(exc), traceback="".join(traceback.format_exception(exc)),
                counted=True)
    return False


@contextmanager
def owned_run(tracker: Tracker, start: Callable[[], str],
              before_close: Callable[[Outcome], None] | None = None) -> Iterator[Outcome]:
    """Create a run with `start()` (which returns its id); the block trains and logs into
    it and sets the yielded Outcome (whose `run_id` it is). Whatever happens, the run is
    closed in the outcome's state (after `before_close(outcome)`, which tells Optuna). Any
    exception of the block fails the run and is swallowed, except Ctrl-C/SIGTERM and store
    failures, which fail it and go on up to stop the sweep. A Ctrl-C that comes while the
    run is created closes it too: it is raised once this function owns the run."""
    outcome, propagating = Outcome(), False
    try:
        with signals.held():
            outcome.run_id = start()
        yield outcome
    except (KeyboardInterrupt, Exception) as exc:
        if outcome.run_id is None:
            raise  # no run to close: its trial stays RUNNING for the repair
        propagating = _record_failure(outcome, exc)
        if propagating:
            raise
    finally:
        problems = []
        for close in (before_close, lambda o: tracker.finish_run(o.run_id, o.state, o.error,
                                                                 o.traceback)):
            if close is None or outcome.run_id is None:
                continue
            try:
                close(outcome)
            except Exception as exc:  # noqa: BLE001  (reconcile repairs it next time)
                problems.append(exc)
        if problems and not propagating:
            raise problems[0] if isinstance(problems[0], StoreError) else StoreError(
                describe(problems[0])) from problems[0]


def _fit_logged(tracker: Tracker, run_id: str, config: TrainConfig, data,
                on_epoch: Callable | None = None):
    def log_epoch(stats):
        signals.check()  # a Ctrl-C whose first raise Python dropped stops here
        tracker.log_epoch(run_id, stats)
        return on_epoch(stats) if on_epoch else False

    result = train.fit(config, data, on_epoch=log_epoch)
    tracker.log_result(run_id, result)
    return result


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, tracker: Tracker,
          run_id: str) -> None:
    if outcome.state == "failed":  # it may have failed before its params were logged
        try:
            tracker.log_missing_params(run_id, trial.params)
        except StoreError:
            pass  # the state below matters more; the error says what happened
    if outcome.error:
        storage_call(trial.set_user_attr, "error", outcome.error[:2000])
    if not outcome.counted:
        storage_call(trial.set_user_attr, "interrupted", True)
    value = outcome.value if outcome.state == "complete" else None
    try:
        storage_call(study.tell, trial, value, state=STATE_OF[outcome.state])
    except StoreError as exc:
        if isinstance(exc.__cause__, optuna.exceptions.UpdateFinishedTrialError):
            raise StoreError(f"trial {trial.number} was failed by another worker (no "
                             "heartbeat reached the study storage for its grace period); its "
                             "params are retried there") from exc
        raise


@dataclass
class _Member:
    """A claimed trial inside a group: its config (or why it has none), and its end (with
    its run)."""

    trial: optuna.Trial
    config: TrainConfig | None = None
    problem: Exception | None = None
    outcome: Outcome | None = None

    @property
    def run_id(self) -> str:
        return self.outcome.run_id


def run_group(study: optuna.Study, trials: list[optuna.Trial], ctx: StudyContext, data,
              tracker: Tracker) -> list[Outcome]:
    """Run claimed trials, fused where their configs can share batches (see
    train.group_key), each from its run's creation to both records closed. Returns their
    outcomes in order. Ctrl-C or a store failure closes every member's run and goes on up."""
    try:
        return _run_groups(study, trials, ctx, data, tracker)
    finally:  # whatever did not run is now a stale trial of this process, for the repair
        for trial in trials:
            LIVE.discard(trial._trial_id)


def _run_groups(study: optuna.Study, trials: list[optuna.Trial], ctx: StudyContext, data,
                tracker: Tracker) -> list[Outcome]:
    from optimsweep.sweep.space import suggest_config

    members = [_Member(t) for t in trials]
    for member in members:  # recorded in Optuna now; on the run once it exists
        try:
            member.config = suggest_config(member.trial, ctx.spec.search_space,
                                           ctx.spec.base_config())
        except StoreError:
            raise  # nothing runs yet: the next claim fails these trials as stale
        except Exception as exc:  # noqa: BLE001  (this trial's failure, given its run below)
            member.problem = exc
    groups: dict[tuple, list[_Member]] = {}
    for member in members:
        key = (train.group_key(member.config) if member.config is not None
               else ("failed", member.trial.number))
        groups.setdefault(key, []).append(member)
    stopping = None
    for group in groups.values():
        try:
            _run_fused(study, group, ctx, data, tracker)
        except StoreError as exc:  # every member is closed; the rest never start
            stopping = stopping or exc
            break
    if stopping is not None:  # trials of groups that never ran stay RUNNING for the repair
        raise stopping
    return [m.outcome for m in members]


def _run_fused(study: optuna.Study, group: list[_Member], ctx: StudyContext, data,
               tracker: Tracker) -> None:
    """One group's lives: runs started, configs fitted as one fused group, each trial told
    and its run closed in the same state (owned_run), whatever ends it."""
    spec = ctx.spec
    stopping: list[BaseException] = []
    with ExitStack() as lives:
        for member in group:
            trial = member.trial
            lives.enter_context(heartbeat(study._storage, trial._trial_id))
            # Until its run exists the trial stays RUNNING: if we die here, reconcile
            # gives it a run and fails it, so no finished trial is ever without one.
            member.outcome = lives.enter_context(owned_run(
                tracker, functools.partial(_start_trial_run, member, len(group), ctx, data.device,
                                           tracker),
                lambda o, t=trial: _tell(study, t, o, tracker, o.run_id)))
        fitting = []
        for member in group:
            try:
                if member.problem is not None:
                    raise member.problem
                tracker.log_config(member.run_id, member.config, member.trial.params)
                fitting.append(member)
            except Exception as exc:  # noqa: BLE001
                if _record_failure(member.outcome, exc):
                    stopping.append(exc)
        try:
            results = train.fit_group([m.config for m in fitting], data,
                                      [_watch(study, m, ctx, tracker) for m in fitting])
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory: the whole group's)
            results = [exc] * len(fitting)
        for member, result in zip(fitting, results, strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                _finish(member, result, spec.metric, tracker)
            except Exception as exc:  # noqa: BLE001
                if _record_failure(member.outcome, exc):
                    stopping.append(exc)
    if stopping:
        raise stopping[0]


def _start_trial_run(member: _Member, group_size: int, ctx: StudyContext, device,
                     tracker: Tracker) -> str:
    trial, retry_of = member.trial, member.trial.user_attrs.get("retry_of")
    run_id = tracker.start_run(
        ctx.experiment_id, ctx.parent_run_id, ctx.spec.name, trial.number,
        tags={"optimsweep.device": str(device),
              "optimsweep.fused": str(group_size),  # members of its group
              **({"optimsweep.precision": train.resolve_precision(member.config.precision,
                                                                   device)}
                 if member.config is not None else {}),
              **({"optimsweep.retry_of": str(retry_of)} if retry_of is not None else {})})
    storage_call(trial.set_user_attr, "mlflow_run_id", run_id)
    return run_id


def _watch(study: optuna.Study, member: _Member, ctx: StudyContext, tracker: Tracker):
    """The member's on_epoch: log the epoch, report it to Optuna, ask the pruner."""
    trial, config, metric = member.trial, member.config, ctx.spec.metric

    def on_epoch(stats) -> bool:
        signals.check()  # a Ctrl-C whose first raise Python dropped stops here
        tracker.log_epoch(member.run_id, stats)
        value = stats.value(metric)
        if not math.isfinite(value):
            raise DivergedError(stats.epoch, 0, value, what=metric)
        storage_call(trial.report, value, stats.epoch)
        # After the last epoch there is nothing left to save by pruning.
        return stats.epoch < config.epochs and storage_call(trial.should_prune)

    return on_epoch


def _finish(member: _Member, result, metric: str, tracker: Tracker) -> None:
    tracker.log_result(member.run_id, result)
    for key, value in (("test_loss", result.test_loss),
                       ("test_accuracy", result.test_accuracy), *result.test_extra.items(),
                       ("epochs_run", len(result.history))):
        if value is not None:
            storage_call(member.trial.set_user_attr, key, value)
    member.outcome.end(state="pruned" if result.stopped_early else "complete",
                       value=result.final.value(metric), error=None, counted=True,
                       test_accuracy=result.test_accuracy)


def run_confirmation(tracker: Tracker, ctx: StudyContext, trial_number: int,
                     config: TrainConfig, sampled: dict, data) -> Outcome:
    """One re-training of a trial's config with another seed, as a `confirm` child run."""
    start = functools.partial(
        tracker.start_run, ctx.experiment_id, ctx.parent_run_id, ctx.spec.name, trial_number,
        role="confirm", run_name=f"confirm trial {trial_number:03d} seed {config.seed}",
        tags={"optimsweep.seed": str(config.seed)})
    with owned_run(tracker, start) as outcome:
        run_id = outcome.run_id
        tracker.log_config(run_id, config, sampled)
        result = _fit_logged(tracker, run_id, config, data)
        value = result.final.value(ctx.spec.metric)
        if not math.isfinite(value):
            raise DivergedError(result.final.epoch, 0, value, what=ctx.spec.metric)
        outcome.end(state="complete", value=value, error=None, counted=True,
                    test_accuracy=result.test_accuracy)
    return outcome


# ---------------------------------------------------------------- after a crash

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_gone(host: str | None, pid: str | int | None, trial_id: int | None = None) -> bool:
    """True when the process that owns a trial or run has ended (only knowable on its own
    host; other hosts' trials are for the heartbeat of a server storage)."""
    if host != socket.gethostname() or pid is None:
        return False
    pid = int(pid)
    if pid == os.getpid():
        return trial_id is not None and trial_id not in LIVE
    return not _pid_alive(pid)


def is_stale(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process has ended. Called with the study lock held: a trial
    gets its host and pid inside the same lock that asked for it, so one without them was
    left by a process that died in between."""
    if trial.state != TrialState.RUNNING:
        return False
    host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
    return host is None or pid is None or owner_gone(host, pid, trial._trial_id)


def _silent(study: optuna.Study) -> set[int]:
    """Trial ids whose heartbeat (server storages only) is older than the grace period."""
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return set()
    return set(storage_call(storage._get_stale_trial_ids, study._study_id, retry=False))


def fail_stale_trials(study: optuna.Study, tracker: Tracker, ctx: StudyContext) -> list[int]:
    """Close the RUNNING trials whose process has ended (on this host) or whose heartbeat
    stopped (any host): failed and `interrupted` (they don't use up budget), each with
    exactly one FAILED run. On a server storage Optuna's stale-trial callback then queues
    its params again. Call with the study lock held."""
    runs = None
    failed = []
    silent = _silent(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not (is_stale(t) or t._trial_id in silent):
            continue
        if runs is None:
            runs = tracker.runs(ctx.experiment_id, "trial")
        run_id = t.user_attrs.get("mlflow_run_id") or next(
            (r.info.run_id for r in runs if r.data.tags.get(TRIAL) == str(t.number)), None)
        if run_id is None:  # it died before its run was created: give it one
            run_id = tracker.start_run(ctx.experiment_id, ctx.parent_run_id, ctx.spec.name,
                                       t.number)
        tracker.log_missing_params(run_id, t.params)  # it may have died before logging them
        owner = f"pid {t.user_attrs.get('pid')} on {t.user_attrs.get('host')}"
        reason = (f"interrupted: its process ({owner}) ended before the trial did"
                  if is_stale(t) else
                  f"interrupted: no heartbeat from its worker ({owner}) for "
                  f"{RESILIENCE.grace_period} s or more")
        storage = study._storage
        for key, value in (("mlflow_run_id", run_id), ("interrupted", True), ("error", reason)):
            storage_call(storage.set_trial_user_attr, t._trial_id, key, value, retry=False)
        storage_call(storage.set_trial_state_values, t._trial_id, TrialState.FAIL, retry=False)
        tracker.finish_run(run_id, "failed", error=reason)
        failed.append(t.number)
        retry = (storage.get_heartbeat_stale_trial_callback()
                 if is_heartbeat_enabled(storage) else None)
        if retry is not None:  # Optuna's retry; journal studies retry in the claim instead
            storage_call(retry, study, storage.get_trial(t._trial_id), retry=False)
    return failed


def _close_leftover_waiting(study: optuna.Study, tracker: Tracker,
                            ctx: StudyContext) -> list[str]:
    """Claims enqueue and ask in one step, so a WAITING trial is one whose process died in
    between. While the budget has room the next claim runs it; once it is full, nothing
    would: close it as failed and interrupted, with a run like every trial."""
    from optimsweep.report import counted_trials

    notes = []
    while (len(counted_trials(study)) >= ctx.n_trials and
           any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))):
        trial = storage_call(study.ask)  # takes the oldest waiting trial
        run_id = tracker.start_run(ctx.experiment_id, ctx.parent_run_id, ctx.spec.name,
                                   trial.number)
        storage_call(trial.set_user_attr, "mlflow_run_id", run_id)
        outcome = Outcome(error="interrupted: queued by a process that ended before running it")
        _tell(study, trial, outcome, tracker, run_id)
        tracker.finish_run(run_id, "failed", error=outcome.error)
        notes.append(f"trial {trial.number}: queued but never run, and the budget is used up; "
                     "closed as failed (interrupted)")
    return notes


def reconcile(study: optuna.Study, tracker: Tracker, ctx: StudyContext, *,
              close_parent: bool = False) -> list[str]:
    """Make MLflow match Optuna after whatever ended the last command: stale trials failed,
    every finished trial's run in the matching state, runs of dead processes closed, runs
    that belong to no trial deleted. Returns one note per repair. Call with the study lock
    held."""
    notes = [f"trial {n}: its process had ended; marked failed (interrupted, not counted)"
             for n in fail_stale_trials(study, tracker, ctx)]
    notes += _close_leftover_waiting(study, tracker, ctx)
    trials = study.get_trials(deepcopy=False)
    runs = tracker.runs(ctx.experiment_id, "trial")
    by_number = {str(t.number): t for t in trials}
    run_ids = {t.user_attrs.get("mlflow_run_id") for t in trials}
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        trial = by_number.get(tags.get(TRIAL))
        if run_id not in run_ids:
            if trial is not None and trial.state == TrialState.RUNNING and not is_stale(trial):
                continue  # a live process is between creating the run and recording it
            tracker.delete_run(run_id, "belongs to no Optuna trial (its trial's record was "
                               "lost in a crash)")
            notes.append(f"run {run_id}: belonged to no trial; deleted")
            continue
        if trial is None or not trial.state.is_finished():
            continue
        if any(k not in run.data.params for k in trial.params):  # the store was down then
            tracker.log_missing_params(run_id, trial.params)
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(
            trial.state, "failed")
        if run.info.status != RUN_STATUS[state] or tags.get(STATE) != state:
            tracker.finish_run(run_id, state, error=trial.user_attrs.get("error"))
            notes.append(f"trial {trial.number}: its run was {run.info.status}; now "
                         f"{RUN_STATUS[state]}")
    for run in tracker.runs(ctx.experiment_id, "confirm"):
        if run.info.status == "RUNNING" and owner_gone(run.data.tags.get(HOST),
                                                        run.data.tags.get(PID)):
            tracker.finish_run(run.info.run_id, "failed", error=INTERRUPTED)
            notes.append(f"confirm run {run.info.run_id}: its process had ended; failed")
    present = {r.info.run_id for r in runs}
    missing = [t.number for t in trials
               if t.state.is_finished() and t.user_attrs.get("mlflow_run_id") not in present]
    if missing:
        notes.append(f"trials {', '.join(map(str, missing[:10]))}: their MLflow runs are "
                     "missing from the tracking store (deleted?)")
    if close_parent and not any(t.state == TrialState.RUNNING for t in trials):
        parent = tracker.run(ctx.parent_run_id)
        if parent is not None and parent.info.status == "RUNNING" and owner_gone(
                parent.data.tags.get(HOST), parent.data.tags.get(PID)):
            tracker.set_status(ctx.parent_run_id, "KILLED")
            notes.append("the study's run was left RUNNING by an ended sweep; now KILLED")
    return notes
