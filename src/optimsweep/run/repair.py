"""After a crash: bring the records back to the invariant before anything else happens.

Whatever a crash leaves between a trial's claim and its close (a RUNNING trial of a dead
process, a run still RUNNING, a trial queued and never run) is closed here from Optuna's
side, the source of truth, the next time any command opens the study. Every function here
is called with the study lock held.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optimsweep.records.optuna_adapter import start_trial, trial_id
from optimsweep.records.schema import (
    CONFIRM_ROLE,
    INTERRUPTED,
    TRIAL_ROLE,
    Attr,
    State,
    Tag,
    counted_trials,
    is_paused,
    is_queued,
)
from optimsweep.run.context import OpenStudy

log = logging.getLogger("optimsweep")


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


def owner_gone(host: str | None, pid: str | int | None, live: set[int] = frozenset(),
               trial: int | None = None) -> bool:
    """True when the process that owns a trial (storage id `trial`) or a run has ended: only
    knowable on its own host; other hosts' trials are for the heartbeat of a server
    storage. A trial that names this very process is alive only while it is in `live`."""
    if host != socket.gethostname() or pid is None:
        return False
    pid = int(pid)
    if pid == os.getpid():
        return trial is not None and trial not in live
    return not _pid_alive(pid)


def _abandoned(run) -> bool:
    """A run still RUNNING whose owning process has ended."""
    return run.info.status == State.RUNNING.run_status and owner_gone(
        run.data.tags.get(Tag.HOST), run.data.tags.get(Tag.PID))


def is_stale(trial: optuna.trial.FrozenTrial, live: set[int] = frozenset()) -> bool:
    """A RUNNING trial whose process has ended. A trial gets its host and pid inside the
    same lock that asked for it, so one without them was left by a process that died in
    between."""
    if trial.state != TrialState.RUNNING:
        return False
    host, pid = trial.user_attrs.get(Attr.HOST), trial.user_attrs.get(Attr.PID)
    return host is None or pid is None or owner_gone(host, pid, live, trial_id(trial))


def _fail_with_run(opened: OpenStudy, trial: optuna.trial.FrozenTrial, reason: str,
                   runs: list | None) -> None:
    """Close a RUNNING trial as failed and interrupted (it does not use up budget), with
    exactly one FAILED run: its own, found by id or by trial number, or one made now for a
    trial whose process died before making it."""
    storage, tracker, ref = opened.storage, opened.tracker, opened.ref
    run_id = trial.user_attrs.get(Attr.RUN_ID) or next(
        (r.info.run_id for r in runs or () if r.data.tags.get(Tag.TRIAL) == str(trial.number)),
        None)
    if run_id is None:
        run_id = tracker.start_run(ref.experiment_id, ref.parent_run_id, ref.spec.name,
                                   trial.number, tags=ref.run_tags())
    tracker.log_missing_params(run_id, trial.params)  # it may have died before logging them
    tid = trial_id(trial)
    for key, value in ((Attr.RUN_ID, run_id), (Attr.INTERRUPTED, True), (Attr.ERROR, reason)):
        storage.call(storage.optuna.set_trial_user_attr, tid, key, value, retry=False)
    storage.call(storage.optuna.set_trial_state_values, tid, TrialState.FAIL, retry=False)
    tracker.finish_run(run_id, State.FAILED, error=reason)


def fail_stale_trials(opened: OpenStudy) -> list[int]:
    """Close the RUNNING trials whose process has ended (on this host) or whose heartbeat
    stopped (any host): failed and interrupted, each with exactly one FAILED run. On a
    server storage Optuna's stale-trial callback then queues its params again."""
    study, storage = opened.study, opened.storage
    runs, failed = None, []
    silent = storage.stale_trial_ids(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stale = is_stale(t, opened.live)
        if not (stale or trial_id(t) in silent):
            continue
        if runs is None:
            runs = opened.tracker.runs(opened.ref.experiment_id, TRIAL_ROLE)
        owner = f"pid {t.user_attrs.get(Attr.PID)} on {t.user_attrs.get(Attr.HOST)}"
        reason = (f"interrupted: its process ({owner}) ended before the trial did" if stale
                  else f"interrupted: no heartbeat from its worker ({owner}) for "
                       f"{storage.resilience.grace_period} s or more")
        _fail_with_run(opened, t, reason, runs)
        failed.append(t.number)
        storage.retry_stale(study, trial_id(t))
    return failed


def close_unstarted(opened: OpenStudy) -> list[int]:
    """This process's RUNNING trials that it holds no more: claimed, then Ctrl-C or SIGTERM
    came before their life began. Closed here as a signal closes a trial (failed,
    interrupted, a FAILED run), not left to the next command's repair and its note."""
    me, runs, closed = (socket.gethostname(), os.getpid()), None, []
    for t in opened.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if (t.user_attrs.get(Attr.HOST), t.user_attrs.get(Attr.PID)) != me or \
                trial_id(t) in opened.live:
            continue
        if runs is None:
            runs = opened.tracker.runs(opened.ref.experiment_id, TRIAL_ROLE)
        _fail_with_run(opened, t, INTERRUPTED, runs)
        closed.append(t.number)
    return closed


def _close_leftover_waiting(opened: OpenStudy) -> list[str]:
    """Claims enqueue and start in one step, so a queued trial (WAITING, not paused) is
    one whose process died in between. While the budget has room the next claim runs it;
    once it is full, nothing would: close it as failed and interrupted, with a run like
    every trial."""
    study, notes = opened.study, []
    while len(counted_trials(study)) >= opened.ref.n_trials:
        queued = next((t for t in study.get_trials(deepcopy=False) if is_queued(t)), None)
        if queued is None:
            break
        if opened.storage.call(start_trial, study, queued) is None:
            continue
        trial = study.get_trials(deepcopy=False)[queued.number]
        _fail_with_run(opened, trial, "interrupted: queued by a process that ended before "
                       "running it", runs=None)
        notes.append(f"trial {trial.number}: queued but never run, and the budget is used up; "
                     "closed as failed (interrupted)")
    return notes


def provably_ours(run, ref) -> bool:
    """True only for a run this very study made: a child of its parent run carrying its
    identity. Runs of studies made by earlier versions (no identity) never are, nor are
    those of an earlier study of the same name whose records the study storage lost."""
    tags = run.data.tags
    return bool(ref.study_uid) and tags.get(Tag.PARENT) == ref.parent_run_id and \
        tags.get(Tag.STUDY_UID) == ref.study_uid


def _orphan(opened: OpenStudy, run) -> str | None:
    """A trial run no trial names. Deleted only when it is provably this study's and was
    never closed by its process (a crash between creating the run and recording it in the
    trial); any other is kept: a RUNNING one of an ended process closed FAILED, the rest
    left as they are (a run closed with a verdict was told to Optuna first: its trial's
    record was lost, not never made). Returns the note, if anything was done."""
    tags, run_id = run.data.tags, run.info.run_id
    if provably_ours(run, opened.ref) and tags.get(Tag.STATE) == State.RUNNING.word:
        opened.tracker.delete_run(run_id, "belongs to no Optuna trial (its trial's record "
                                  "was lost in a crash)")
        return f"run {run_id}: belonged to no trial; deleted"
    if _abandoned(run):
        reason = ("interrupted: its process ended, and no trial in the study storage names "
                  "this run; kept")
        opened.tracker.finish_run(run_id, State.FAILED, error=reason)
        return f"run {run_id}: no trial names it and its process had ended; failed, kept"
    return None


def reconcile(opened: OpenStudy, *, close_parent: bool = False) -> list[str]:
    """Make MLflow match Optuna after whatever ended the last command: stale trials failed,
    every finished trial's run in the matching state, runs of dead processes closed, runs
    that provably belong to this study and to no trial deleted (`_orphan`). Returns one
    note per repair. Refuses (StoreError) a journal that is no longer the one opened."""
    study, tracker, ref = opened.study, opened.tracker, opened.ref
    opened.storage.check_intact()
    notes = [f"trial {n}: its process had ended; marked failed (interrupted, not counted)"
             for n in fail_stale_trials(opened)]
    notes += _close_leftover_waiting(opened)
    trials = study.get_trials(deepcopy=False)
    runs = tracker.runs(ref.experiment_id, TRIAL_ROLE)
    by_number = {str(t.number): t for t in trials}
    run_ids = {t.user_attrs.get(Attr.RUN_ID) for t in trials}
    kept = []
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        trial = by_number.get(tags.get(Tag.TRIAL))
        if run_id not in run_ids:
            if trial is not None and trial.state == TrialState.RUNNING and \
                    not is_stale(trial, opened.live):
                continue  # a live process is between creating the run and recording it
            note = _orphan(opened, run)
            if note is not None:
                notes.append(note)
            else:
                kept.append(run_id)
            continue
        if trial is not None and is_paused(trial):  # its process died before the run
            if run.info.status != State.PAUSED.run_status:  # said so
                tracker.finish_run(run_id, State.PAUSED)
                notes.append(f"trial {trial.number}: paused; its run was {run.info.status}, "
                             f"now {State.PAUSED.run_status}")
            continue
        if trial is None or not trial.state.is_finished():
            continue
        if any(k not in run.data.params for k in trial.params):  # the store was down then
            tracker.log_missing_params(run_id, trial.params)
        state = State.of_trial(trial)
        if run.info.status != state.run_status or tags.get(Tag.STATE) != state.word:
            tracker.finish_run(run_id, state, error=trial.user_attrs.get(Attr.ERROR))
            notes.append(f"trial {trial.number}: its run was {run.info.status}; now "
                         f"{state.run_status}")
    for run in tracker.runs(ref.experiment_id, CONFIRM_ROLE):
        if _abandoned(run):
            tracker.finish_run(run.info.run_id, State.FAILED, error=INTERRUPTED)
            notes.append(f"confirm run {run.info.run_id}: its process had ended; failed")
    present = {r.info.run_id for r in runs}
    missing = [t.number for t in trials
               if t.state.is_finished() and t.user_attrs.get(Attr.RUN_ID) not in present]
    if missing:
        notes.append(f"trials {', '.join(map(str, missing[:10]))}: their MLflow runs are "
                     "missing from the tracking store (deleted?)")
    if kept:
        notes.append(f"runs {', '.join(kept[:5])}{' …' if len(kept) > 5 else ''}: no trial "
                     "in the study storage names them; kept, not deleted")
    if close_parent and not any(t.state == TrialState.RUNNING for t in trials):
        parent = tracker.run(ref.parent_run_id)
        if parent is not None and _abandoned(parent):
            tracker.set_status(ref.parent_run_id, "KILLED")
            notes.append("the study's run was left RUNNING by an ended sweep; now KILLED")
    return notes


def repair(opened: OpenStudy, *, close_parent: bool = False) -> None:
    """Bring the records back to the invariant, under the study lock; one `note:` line per
    repair."""
    with opened.lock():
        for note in reconcile(opened, close_parent=close_parent):
            log.warning(note)
