"""The life of a trial, from claimed to closed, and of every run it starts: suggest, start
the run, fit, log, then tell Optuna and close the MLflow run in the same state, however it
ends. `owned_run` is the one place a run is closed.

The rule that keeps Optuna and MLflow 1:1: a run is closed only after its trial is told, so
Optuna is always the source of truth; and a trial is told only once its run exists, so no
finished trial lacks a run. Whatever a crash leaves in between (a RUNNING trial of a dead
process, a run still RUNNING) `repair.reconcile` closes from Optuna's side the next time any
command opens the study.
"""

from __future__ import annotations

import functools
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import optuna

from optimsweep.core import train
from optimsweep.core.checkpoint import Checkpointer
from optimsweep.core.devices import device_facts
from optimsweep.core.train import EpochStats, TrainConfig
from optimsweep.errors import DivergedError, StoreError, describe
from optimsweep.records.optuna_adapter import trial_id
from optimsweep.records.schema import (
    BEST_STEP,
    CONFIRM_ROLE,
    INTERRUPTED,
    Attr,
    State,
    Tag,
    best_metric,
    is_paused,
)
from optimsweep.records.tracking import Tracker
from optimsweep.run import resume
from optimsweep.run.context import OpenStudy
from optimsweep.run.progress import say
from optimsweep.sweep.space import suggest_config
from optimsweep.util import signals
from optimsweep.util.provenance import slurm_task


class TrialTaken(Exception):
    """The trial is no longer this process's: another one finished it (on a server storage,
    a worker silent for the grace period has its trial failed and retried elsewhere). Its
    records are that process's now: nothing more is written to the trial, its run or the
    study's run, and the message is the note this process prints before going on."""

    def __init__(self, trial: optuna.Trial):
        super().__init__(
            f"trial {trial.number} was closed by another worker while this one was paused or "
            "cut off for the heartbeat grace period; its params are retried there, its run "
            "is left as that worker closed it, and this worker goes on with new trials")


@dataclass
class Outcome:
    """How a trial (or a confirm run) ended. `counted` is False when the trial could not
    give its config a verdict (interrupted, a store failed): it does not use up budget."""

    state: State = State.FAILED
    value: float | None = None
    error: str | None = INTERRUPTED
    traceback: str | None = None
    counted: bool = False
    test_accuracy: float | None = None
    run_id: str | None = None  # its MLflow run, once created
    taken: str | None = None  # TrialTaken's note: not this process's to record any more
    paused_at: int | None = None  # the rung's step, when PAUSED

    def end(self, **how) -> None:
        """Record how it ended; what `how` leaves out takes the defaults above (failed,
        interrupted, not counted)."""
        vars(self).update(vars(Outcome(**how, run_id=self.run_id, taken=self.taken)))


def _record_failure(outcome: Outcome, exc: BaseException) -> bool:
    """Record how `exc` ended a trial or run; True when it must go on up and stop the sweep
    (Ctrl-C/SIGTERM, a store failure). Anything else is the trial's own failure: counted,
    with its traceback. A trial taken by another process records nothing (TrialTaken)."""
    if isinstance(exc, TrialTaken):
        outcome.taken = str(exc)
        return False
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
    run is created closes it too: it is raised once this function owns the run. A trial
    found taken by another process (TrialTaken, from the block or `before_close`) is
    neither told nor closed: that process closed both; `outcome.taken` says so."""
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
        # Telling Optuna and closing the run, both or neither: a signal between the two
        # left a finished trial with a RUNNING run for the next command to repair
        with signals.held():
            for close in (before_close, lambda o: o.state == State.PAUSED or
                          tracker.finish_run(o.run_id, o.state, o.error, o.traceback)):
                if close is None or outcome.run_id is None or outcome.taken:
                    continue  # a pause: before_close closed its run
                try:
                    close(outcome)
                except TrialTaken as exc:
                    outcome.taken = str(exc)
                except Exception as exc:  # noqa: BLE001  (reconcile repairs it next time)
                    problems.append(exc)
        if problems and not propagating:
            raise problems[0] if isinstance(problems[0], StoreError) else StoreError(
                describe(problems[0])) from problems[0]


@dataclass
class _Member:
    """A claimed trial inside a group: its config (or why it has none), and its end (with
    its run)."""

    trial: optuna.Trial
    config: TrainConfig | None = None
    problem: Exception | None = None
    outcome: Outcome = field(default_factory=Outcome)
    found: resume.Found | None = None  # the checkpoint it goes on from
    earlier_runs: list[str] = field(default_factory=list)  # of the trials it retries
    writer: Checkpointer | None = None
    promoted: str | None = None  # the run of a paused trial it goes on with
    paused_at: int | None = None  # the rung it stopped at, to be promoted from later

    @property
    def run_id(self) -> str:
        return self.outcome.run_id


def run_trials(opened: OpenStudy, trials: tuple[optuna.Trial, ...], data,
               on_report: Callable[[], None] | None = None) -> list[Outcome]:
    """Run claimed trials, fused where their configs can share batches (see
    train.group_key), each from its run's creation (or a promoted trial's return to its
    run) to both records closed or paused. Returns their outcomes in order; `on_report()`
    is called after each epoch any of them reports. Ctrl-C or a store failure closes every
    member's run and goes on up; trials of groups that never ran stay RUNNING for the
    repair."""
    try:
        members = [_Member(t, promoted=t.user_attrs.get(Attr.RUN_ID)
                           if t.user_attrs.get(Attr.PROMOTIONS) else None) for t in trials]
        for member in members:  # recorded in Optuna now; on the run once it exists
            try:
                member.config = suggest_config(member.trial, opened.spec.search_space,
                                               opened.spec.base_config())
            except StoreError:
                raise  # nothing runs yet: the next claim fails these trials as stale
            except Exception as exc:  # noqa: BLE001  (this trial's failure, given its run)
                member.problem = exc
        groups: dict[tuple, list[_Member]] = {}
        for member in members:
            key = (train.group_key(member.config) if member.config is not None
                   else ("failed", member.trial.number))
            groups.setdefault(key, []).append(member)
        for group in groups.values():
            _run_group(opened, group, data, on_report)  # a StoreError: every member closed,
            # the rest never start
        return [m.outcome for m in members]
    finally:
        for trial in trials:
            opened.live.discard(trial_id(trial))


def _run_group(opened: OpenStudy, group: list[_Member], data, on_report) -> None:
    """One group's lives: runs started, configs fitted as one fused group, each trial told
    and its run closed in the same state (owned_run), whatever ends it."""
    stopping: list[BaseException] = []
    with ExitStack() as lives:
        for member in group:
            lives.enter_context(opened.storage.heartbeat(trial_id(member.trial)))
            # Until its run exists the trial stays RUNNING: if we die here, the repair
            # gives it a run and fails it, so no finished trial is ever without one.
            member.outcome = lives.enter_context(owned_run(
                opened.tracker,
                functools.partial(_start_run, opened, member, len(group), data),
                functools.partial(_tell, opened, member.trial)))
        fitting = []
        for member in group:
            try:
                if member.problem is not None:
                    raise member.problem
                if member.promoted is None:
                    opened.tracker.log_config(member.run_id, member.config,
                                              member.trial.params)
                _resume(opened, member)
                if _judged_at_rung(opened, member):
                    continue  # paused where its checkpoint left it
                member.writer = resume.checkpointer(
                    opened.tracker, member.run_id, opened.spec.checkpoint,
                    functools.partial(_check_mine, opened, member.trial))
                fitting.append(member)
            except Exception as exc:  # noqa: BLE001
                if _record_failure(member.outcome, exc):
                    stopping.append(exc)
        try:
            results = train.fit_group(
                [m.config for m in fitting], data,
                [_on_epoch(opened, m, on_report) for m in fitting],
                resume=[m.found.state if m.found else None for m in fitting],
                checkpoints=[m.writer for m in fitting],
                reports_per_epoch=opened.spec.budget.reports_per_epoch)
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory: the whole group's)
            results = [exc] * len(fitting)
        for member, result in zip(fitting, results, strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                _finish(opened, member, result)
            except Exception as exc:  # noqa: BLE001
                if _record_failure(member.outcome, exc):
                    stopping.append(exc)
            ended = member.outcome.counted and member.outcome.state != State.PAUSED
            if ended and not member.outcome.taken:  # nothing to go on from
                resume.drop(opened.tracker, [member.run_id, *member.earlier_runs])
    if stopping:
        raise stopping[0]


def _resume(opened: OpenStudy, member: _Member) -> None:
    """A promoted trial goes on from its own checkpoint, in its own run, whose curve and
    intermediate values already hold the epochs before it. A retry of an interrupted trial
    goes on from the newest checkpoint of the trials it retries: its run gets the curve so
    far, its trial the intermediate values, both say where it went on from."""
    trial, tracker = member.trial, opened.tracker
    per_epoch = opened.spec.budget.reports_per_epoch
    # A read of the study: a database restarted now is ridden out, not this trial's failure
    runs = opened.storage.call(resume.retried_runs, opened.study, trial)
    member.earlier_runs = [run_id for run_id, _ in runs]
    if member.promoted is not None:
        found = member.found = resume.latest(tracker, [(member.promoted, trial.number), *runs],
                                             member.config, f"trial {trial.number}", per_epoch)
        say(f"trial {trial.number}: promoted, goes on from epoch "
            f"{found.state.epoch / per_epoch if found else 0:g} of {member.config.epochs}"
            + ("" if found else " (no usable checkpoint: it starts over)"))
        if found is not None:
            tracker.set_tag(member.run_id, Tag.PROMOTIONS,
                            str(trial.user_attrs.get(Attr.PROMOTIONS, 1)))
        return
    found = member.found = resume.latest(tracker, runs, member.config, f"trial {trial.number}",
                                         per_epoch)
    if found is None:
        return
    history = resume.continue_run(tracker, member.run_id, found, f"trial {trial.number}",
                                  member.config.epochs)
    best = _Best(opened.spec.metric, opened.spec.maximize)
    tracker.log_steps(member.run_id, {stats.epoch: best.add(stats) for stats in history})
    _trial_write(opened, trial, trial.set_user_attr, Attr.RESUMED_FROM,
                 {"trial": found.trial, "epoch": found.state.epoch})
    for stats in history:
        _trial_write(opened, trial, trial.report, stats.value(opened.spec.metric), stats.epoch)


def _judged_at_rung(opened: OpenStudy, member: _Member) -> bool:
    """A retry that goes on from a checkpoint at a rung (its trial was interrupted between
    writing it and recording its verdict) is judged there first; True when it is paused at
    once, without training (a later promotion finds the checkpoint in the run it retries)."""
    spec, found = opened.spec, member.found
    if spec.asha is None or found is None or member.promoted is not None:
        return False
    step = found.state.epoch
    trials = opened.storage.call(opened.study.get_trials, deepcopy=False)
    if step not in spec.rungs or \
            spec.asha.keeps_going(trials, member.trial.number, step, spec.maximize):
        return False
    member.paused_at = step
    _record_rung(opened, member)
    member.outcome.end(state=State.PAUSED, error=None, counted=True, paused_at=step)
    return True


def _record_rung(opened: OpenStudy, member: _Member) -> None:
    """The rung a trial stops at, on its run: "1 (epoch 3)"."""
    spec = opened.spec
    opened.tracker.set_tag(member.run_id, Tag.RUNG, rung_text(
        spec.rungs.index(member.paused_at), member.paused_at / spec.budget.reports_per_epoch))


def _start_run(opened: OpenStudy, member: _Member, group_size: int, data) -> str:
    """The trial's run: a new one with the data it trains on as its inputs, or a promoted
    trial's own run (which has them), RUNNING again."""
    if member.promoted is not None:
        opened.tracker.resume_run(member.promoted)
        return member.promoted
    device = data.device
    trial, retry_of = member.trial, member.trial.user_attrs.get(Attr.RETRY_OF)
    ref = opened.ref
    facts = device_facts(device)
    tags = {Tag.DEVICE: str(device), Tag.DEVICE_NAME: facts["name"],
            Tag.DEVICE_INDEX: facts["index"], Tag.FUSED: str(group_size), **ref.run_tags()}
    if "memory_gib" in facts:
        tags[Tag.DEVICE_MEMORY] = facts["memory_gib"]
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        tags[Tag.VISIBLE_DEVICES] = visible
    if job := slurm_task(os.environ):
        tags[Tag.SLURM_JOB] = job
    if member.config is not None:
        tags[Tag.PRECISION] = train.resolve_precision(member.config.precision, device)
    if retry_of is not None:
        tags[Tag.RETRY_OF] = str(retry_of)
    run_id = opened.tracker.start_run(ref.experiment_id, ref.parent_run_id, ref.spec.name,
                                      trial.number, tags=tags)
    opened.storage.call(trial.set_user_attr, Attr.RUN_ID, run_id)
    opened.tracker.log_datasets(run_id, data)
    return run_id


@dataclass
class _Best:
    """A run's best report so far, in the study's direction: its best_<metric> and
    best_epoch metrics. Optuna is told the last report's value (result.final), so for a
    complete trial the latest value of <metric> itself is the study's value; best_<metric>
    says how good the trial got on the way. Ties keep the earlier step; non-finite values
    never count."""

    metric: str
    maximize: bool
    value: float | None = None
    step: int | None = None

    def add(self, stats: EpochStats) -> dict[str, float]:
        """Take in one report; the metrics to log at its step (none before a finite one)."""
        value = stats.value(self.metric)
        if math.isfinite(value) and (self.value is None or (
                value > self.value if self.maximize else value < self.value)):
            self.value, self.step = value, stats.epoch
        return {} if self.value is None else {best_metric(self.metric): self.value,
                                              BEST_STEP: self.step}


def _on_epoch(opened: OpenStudy, member: _Member, on_report: Callable[[], None] | None):
    """The member's on_epoch: log the epoch, report it to Optuna, ask the pruner (or, for
    successive halving with promotion, pause the trial at a rung it doesn't pass)."""
    trial, config, metric, spec = member.trial, member.config, opened.spec.metric, opened.spec
    storage = opened.storage
    steps = config.epochs * spec.budget.reports_per_epoch
    rungs = set(spec.rungs)
    best = _Best(metric, spec.maximize)  # over the reports before the checkpoint too
    for earlier in member.found.state.history if member.found else ():
        best.add(EpochStats(**earlier))

    def on_epoch(stats) -> bool:
        signals.check()  # a Ctrl-C whose first raise Python dropped stops here
        checked_at = _check_mine(opened, trial)
        opened.tracker.log_epoch(member.run_id, stats, best.add(stats), at=checked_at)
        value = stats.value(metric)
        if not math.isfinite(value):
            raise DivergedError(stats.epoch, 0, value, what=metric)
        _trial_write(opened, trial, trial.report, value, stats.epoch)
        if on_report is not None:
            on_report()
        if stats.epoch >= steps:  # nothing left to save by stopping
            return False
        if spec.asha is None:
            return storage.call(trial.should_prune)
        if stats.epoch not in rungs or trial.user_attrs.get(Attr.LEADER):
            return False
        trials = storage.call(opened.study.get_trials, deepcopy=False)
        if spec.asha.keeps_going(trials, trial.number, stats.epoch, spec.maximize):
            return False
        # Written now, not when the group ends: a fused group's Ctrl-C flushes only the
        # members still training.
        member.writer.flush()
        member.paused_at = stats.epoch
        return True

    return on_epoch


def _check_mine(opened: OpenStudy, trial: optuna.Trial) -> float:
    """Before writing into a trial or its run: still this process's (one read on a server
    storage, a look at the journal file otherwise)? Raises TrialTaken, or StoreError when
    the journal was deleted or replaced. Returns the time.time() to date the writes it
    allows: a process stopped between the check and a write (SIGSTOP, a paused VM) sends
    on waking what it was entitled to, dated by the check, not after its stop."""
    checked_at = time.time()  # taken first: the answer holds from before the read
    if not opened.storage.still_running(trial_id(trial)):
        raise TrialTaken(trial)
    return checked_at


def _trial_write(opened: OpenStudy, trial: optuna.Trial, fn, *args, **kwargs):
    """A write into the trial; Optuna refusing it as finished (another worker failed it
    since the last check) means the trial was taken."""
    try:
        return opened.storage.call(fn, *args, **kwargs)
    except StoreError as exc:
        if isinstance(exc.__cause__, optuna.exceptions.UpdateFinishedTrialError):
            raise TrialTaken(trial) from exc
        raise


def _finish(opened: OpenStudy, member: _Member, result) -> None:
    checked_at = _check_mine(opened, member.trial)
    opened.tracker.log_result(member.run_id, result, at=checked_at)
    trained = sum(s.seconds for s in result.history[member.found.state.epoch
                                                    if member.found else 0:])
    writes = resume.describe_writes(member.writer, trained)
    if writes:
        opened.tracker.set_tag(member.run_id, Tag.CHECKPOINTS, writes)
    for key, value in (("test_loss", result.test_loss),
                       ("test_accuracy", result.test_accuracy), *result.test_extra.items(),
                       (Attr.EPOCHS_RUN, _whole(result.final.epochs))):
        if value is not None:
            _trial_write(opened, member.trial, member.trial.set_user_attr, key, value)
    if member.paused_at is not None:
        _record_rung(opened, member)
        member.outcome.end(state=State.PAUSED, error=None, counted=True,
                           test_accuracy=result.test_accuracy, paused_at=member.paused_at)
        return
    member.outcome.end(state=State.PRUNED if result.stopped_early else State.COMPLETE,
                       value=result.final.value(opened.spec.metric), error=None, counted=True,
                       test_accuracy=result.test_accuracy)


def _pause(opened: OpenStudy, trial: optuna.Trial, outcome: Outcome) -> None:
    """Record a pause: the run first (once the trial is WAITING another worker may promote
    it, and its run is then that worker's), then the rung (WAITING without it is a queue
    entry), and WAITING last. A crash in between leaves a RUNNING trial of an ended
    process: the repair fails it, and its retry goes on from the rung's checkpoint."""
    opened.tracker.finish_run(outcome.run_id, State.PAUSED)
    _trial_write(opened, trial, trial.set_user_attr, Attr.PAUSED_AT, outcome.paused_at)
    _trial_write(opened, trial, opened.storage.optuna.set_trial_state_values,
                 trial_id(trial), State.PAUSED.trial_state)


def _whole(epochs: float) -> int | float:
    """3.0 -> 3: whole epochs read as such; parts of one (reports within epochs) stay."""
    return int(epochs) if epochs == int(epochs) else epochs


def _tell(opened: OpenStudy, trial: optuna.Trial, outcome: Outcome) -> None:
    """Tell Optuna how the trial ended (before its run is closed: Optuna is the truth).
    A trial another process finished meanwhile is not told (TrialTaken); a lost journal is
    not written to (StoreError: the run is still closed, with the reason)."""
    _check_mine(opened, trial)
    if outcome.state == State.FAILED:  # it may have failed before its params were logged
        try:
            opened.tracker.log_missing_params(outcome.run_id, trial.params)
        except StoreError:
            pass  # the state below matters more; the error says what happened
    if outcome.error:
        _trial_write(opened, trial, trial.set_user_attr, Attr.ERROR, outcome.error[:2000])
    if not outcome.counted:
        _trial_write(opened, trial, trial.set_user_attr, Attr.INTERRUPTED, True)
    if outcome.state == State.PAUSED:
        _pause(opened, trial, outcome)
        return
    value = outcome.value if outcome.state == State.COMPLETE else None
    _trial_write(opened, trial, opened.study.tell, trial, value,
                 state=outcome.state.trial_state)


def rung_text(rung: int, epochs: float) -> str:
    """What a paused or stopped run's RUNG tag says: "1 (epoch 3)", "0 (epoch 0.25)"."""
    return f"{rung} (epoch {epochs:g})"


def close_paused(opened: OpenStudy) -> list[int]:
    """The study is over (the budget used up, nothing running that could promote them):
    trials still paused end as pruned, at the rung they stopped at (their runs keep the
    RUNG tag), and their checkpoints are removed. Called under the study lock."""
    closed = []
    for trial in opened.study.get_trials(deepcopy=False):
        if not is_paused(trial):
            continue
        tid, run_id = trial_id(trial), trial.user_attrs.get(Attr.RUN_ID)
        opened.storage.call(opened.storage.optuna.set_trial_state_values, tid,
                            State.PRUNED.trial_state, retry=False)
        if run_id is not None:
            opened.tracker.finish_run(run_id, State.PRUNED)
            earlier = opened.storage.call(resume.retried_runs, opened.study, trial, retry=False)
            resume.drop(opened.tracker, [run_id, *(r for r, _ in earlier)])
        closed.append(trial.number)
    return closed


def run_confirmation(opened: OpenStudy, trial_number: int, config: TrainConfig,
                     sampled: dict, data, earlier: list[str] = ()) -> Outcome:
    """One re-training of a trial's config with another seed, as a `confirm` child run; it
    goes on from the newest usable checkpoint of `earlier` (interrupted confirm runs of the
    same trial and seed), whose checkpoints it removes once it has finished."""
    ref, tracker, metric = opened.ref, opened.tracker, opened.spec.metric
    what = f"confirm trial {trial_number:03d} seed {config.seed}"
    start = functools.partial(
        tracker.start_run, ref.experiment_id, ref.parent_run_id, ref.spec.name, trial_number,
        role=CONFIRM_ROLE, run_name=what, tags={Tag.SEED: str(config.seed), **ref.run_tags()})
    with owned_run(tracker, start) as outcome:
        run_id = outcome.run_id
        tracker.log_config(run_id, config, sampled)
        found = resume.latest(tracker, [(r, None) for r in earlier], config, what)
        if found is not None:
            resume.continue_run(tracker, run_id, found, what, config.epochs)

        def log_epoch(stats) -> bool:
            signals.check()  # a Ctrl-C whose first raise Python dropped stops here
            tracker.log_epoch(run_id, stats)
            return False

        result = train.fit(config, data, on_epoch=log_epoch,
                           resume=found.state if found else None,
                           checkpointer=resume.checkpointer(tracker, run_id,
                                                            opened.spec.checkpoint))
        tracker.log_result(run_id, result)
        resume.drop(tracker, [run_id, *earlier])
        value = result.final.value(metric)
        if not math.isfinite(value):
            raise DivergedError(result.final.epoch, 0, value, what=metric)
        outcome.end(state=State.COMPLETE, value=value, error=None, counted=True,
                    test_accuracy=result.test_accuracy)
    return outcome
