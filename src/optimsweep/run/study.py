"""The study loop: open or resume a study with its MLflow parent run, claim the budget one
trial at a time, run trials in this process or in worker processes, and close the parent
run with the study's summary, however the sweep ends."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optimsweep.core.data import TASKS
from optimsweep.errors import WorkersFailed
from optimsweep.records.storage import (
    RESILIENCE,
    StoreError,
    describe,
    is_heartbeat_enabled,
    is_journal,
    open_storage,
    resolve_storage,
    storage_call,
    study_lock,
)
from optimsweep.records.tracking import (
    HOST,
    PID,
    Tracker,
    configure_http_retries,
    resolve_tracking_uri,
)
from optimsweep.report import counted_trials, log_summary
from optimsweep.run.life import LIVE, reconcile
from optimsweep.sweep.check import load_spec, parse_spec
from optimsweep.sweep.samplers import build_pruner, build_sampler, grid_space, sampler_seed
from optimsweep.sweep.spec import NAME_PATTERN, Spec, SpecError
from optimsweep.util.signals import Interrupted, stop_on_signals
from optimsweep.util.signals import check as check_signals
from optimsweep.util.signals import held as held_signals
from optimsweep.util.terminal import quiet
from optimsweep.util.urls import redact, redact_text

log = logging.getLogger("optimsweep")
SUMMARIZED = "optimsweep.summarized"  # the trials the parent run's summary and plots show
WORKER_STOP_SECONDS = 60  # how long a worker may take to close its trial after SIGTERM



@dataclass
class StudyContext:
    """What every worker needs to run trials of one study; picklable for worker processes."""

    spec: Spec
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    n_trials: int


@dataclass
class OpenStudy:
    spec: Spec
    study: optuna.Study
    tracker: Tracker
    ctx: StudyContext


def _configure_stores(spec: Spec) -> None:
    """This process rides out its stores as the sweep file says (heartbeat, retries)."""
    vars(RESILIENCE).update(vars(spec.resilience))
    configure_http_retries(spec.resilience.store_timeout)


def _check_fingerprint(study: optuna.Study, spec: Spec) -> None:
    known = study.user_attrs.get("fingerprint")
    if known is not None and known != spec.fingerprint():
        raise SpecError(
            f"{spec.path}: name: study {spec.name!r} already exists with a different task, "
            "search space, metric or fixed values; its trials would not be comparable. Give "
            "this sweep a new name (or delete the old study).")


def _lost_records(study: optuna.Study, spec: Spec, uri: str) -> StoreError:
    return StoreError(
        f"tracking store {redact(uri)} has no record of study {spec.name!r} (its parent run "
        f"{study.user_attrs['mlflow_parent_run_id']} is missing): it was deleted or replaced "
        "after the study began. Restore it, point tracking_uri at the store the study used, "
        "or give the sweep a new name")


def _open_tracking(study: optuna.Study | None, spec: Spec) -> Tracker:
    """The study's tracking store, refusing one that lost the study's records (mlflow.db
    deleted or replaced): carrying on would leave trials whose weights can't be found.
    A missing SQLite file is refused before it would be created anew."""
    uri = resolve_tracking_uri(spec.tracking_uri)
    parent = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
    if parent and uri.startswith("sqlite:///") and \
            not Path(uri.removeprefix("sqlite:///")).is_file():
        raise _lost_records(study, spec, uri)
    tracker = Tracker(uri)
    if parent and (tracker.experiment_id(spec.name, create=False) is None
                   or tracker.run(parent) is None):
        raise _lost_records(study, spec, uri)
    return tracker


def _given(t) -> dict:
    """A trial's params; an enqueued one has them before it suggests them."""
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def _next_enqueued(trials: list, spec: Spec) -> tuple[dict, dict] | None:
    """What to run before sampling anything new, with the user attrs to give it: each
    baseline until it has a counted outcome (or is running), then the config of an
    interrupted trial (a bounded number of times: it never got a verdict)."""
    for params in spec.baseline:
        if not any(t.user_attrs.get("baseline") and not t.user_attrs.get("interrupted") and
                   all(_given(t).get(k) == v for k, v in params.items()) for t in trials):
            return params, {"baseline": True}
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        retries = t.user_attrs.get("retries", 0)
        if (t.user_attrs.get("interrupted") and not t.user_attrs.get("baseline") and _given(t)
                and t.number not in retried and retries < RESILIENCE.max_retry):
            return _given(t), {"retry_of": t.number, "retries": retries + 1}
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


def open_study(spec: Spec, *, workers: int = 1, n_trials: int | None = None) -> OpenStudy:
    """Create or resume the study and its MLflow parent run, and repair what an earlier
    command left behind. Everything is checked before anything is created."""
    _configure_stores(spec)
    storage_url = resolve_storage(spec.storage)
    if workers > 1 and storage_url.startswith("sqlite"):
        raise SpecError(f"{spec.path}: storage: SQLite can't serve {workers} parallel workers; "
                        "use a journal file path (the default) or a PostgreSQL URL")
    storage = open_storage(storage_url)
    sweep_text = redact_text(spec.text)  # a password written in the file is not kept
    with study_lock(storage_url, spec.name):
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            study = None
        if study is not None:
            _check_fingerprint(study, spec)
        tracker = _open_tracking(study, spec)
        if study is None:
            study = optuna.create_study(study_name=spec.name, storage=storage,
                                        direction=spec.direction)
            study.set_user_attr("fingerprint", spec.fingerprint())
            study.set_user_attr("sweep_file", str(spec.path))
            # `export STUDY` works without the file
            study.set_user_attr("sweep_text", sweep_text)
        experiment_id = tracker.experiment_id(spec.name)
        parent = tracker.study_run(
            experiment_id, spec.name, sweep_text=sweep_text, sweep_file=str(spec.path),
            tags={"optimsweep.sampler": spec.sampler.get("name", "tpe"),
                  "optimsweep.sampler_options": str(spec.sampler),
                  "optimsweep.pruner": spec.pruner.get("name", "median"),
                  "optimsweep.pruner_options": str(spec.pruner),
                  "optimsweep.metric": f"{spec.direction} {spec.metric}",
                  "optimsweep.storage": redact(storage_url),
                  HOST: socket.gethostname(), PID: os.getpid(),  # the last sweep to open it
                  "optimsweep.sweep_fingerprint": spec.fingerprint()})
        study.set_user_attr("mlflow_experiment_id", experiment_id)
        study.set_user_attr("mlflow_parent_run_id", parent)
        ctx = StudyContext(spec, storage_url, tracker.uri, experiment_id, parent,
                           n_trials or spec.budget.n_trials)
        for note in reconcile(study, tracker, ctx):
            log.warning(note)
    return OpenStudy(spec, study, tracker, ctx)


def open_existing(target: str | Path) -> OpenStudy:
    """A sweep file or a study name -> its study and tracking, creating nothing. The sweep
    file must still match the study (else its config would not match the trials)."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = load_spec(path)
        name, storage_url = spec.name, resolve_storage(spec.storage)
    else:
        spec, name, storage_url = None, str(target), resolve_storage(None)
        if not NAME_PATTERN.fullmatch(name):
            raise SpecError(f"{name!r}: neither a sweep file nor a study name (letters, "
                            "digits, '.', '_' and '-')")
    if spec is not None:
        _configure_stores(spec)
    if is_journal(storage_url) and not Path(storage_url).is_file():
        raise SpecError(f"no study store at {storage_url}; run `optimsweep sweep FILE` first")
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise SpecError(f"no study named {name!r} in {redact(storage_url)}; known: "
                        f"{', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    if spec is None:  # the study keeps the sweep file it was created from
        if "sweep_text" not in study.user_attrs:
            raise SpecError(f"study {name!r} does not hold its sweep file; pass the file "
                            f"instead ({study.user_attrs.get('sweep_file', 'sweeps/NAME.yaml')})")
        spec = parse_spec(study.user_attrs["sweep_text"], study.user_attrs["sweep_file"])
    _check_fingerprint(study, spec)
    if "mlflow_parent_run_id" not in study.user_attrs:
        raise SpecError(f"study {name!r} has no MLflow records yet; run `optimsweep sweep` "
                        "on it first")
    tracker = _open_tracking(study, spec)
    ctx = StudyContext(spec, storage_url, tracker.uri, study.user_attrs["mlflow_experiment_id"],
                       study.user_attrs["mlflow_parent_run_id"], spec.budget.n_trials)
    return OpenStudy(spec, study, tracker, ctx)


def repair(opened: OpenStudy, *, close_parent: bool = False) -> None:
    """Bring the records back to the invariant (see trial.reconcile), under the study lock."""
    with study_lock(opened.ctx.storage_url, opened.spec.name):
        for note in reconcile(opened.study, opened.tracker, opened.ctx,
                              close_parent=close_parent):
            log.warning(note)


# ---------------------------------------------------------------- claiming the budget

WAIT = "wait"  # the budget is held by other processes' running trials: ask again soon


def _others_running(study: optuna.Study, counted: list) -> bool:
    """Counted trials still running in other processes, whose end this process will see:
    they finish, or they are found dead (same host: pid; any host: no heartbeat) and their
    params are retried. Trials of another host without a heartbeat can't be watched."""
    running = [t for t in counted if t.state == TrialState.RUNNING]
    return bool(running) and (is_heartbeat_enabled(study._storage) or all(
        t.user_attrs.get("host") == socket.gethostname() for t in running))


def claim_trial(study: optuna.Study, ctx: StudyContext, tracker: Tracker):
    """Under the study lock: close trials of ended processes, and if the budget has room,
    ask Optuna for the next trial (a baseline, a retry or a grid point first). None when the
    budget is used up; WAIT while it is held by trials running elsewhere that may yet fail.
    Nothing waits in the queue outside this lock, so no trial is left WAITING; signals wait
    until the trial says which process owns it. Inside the lock no call is retried: the
    lock lives on a database connection, and a lost connection loses it."""
    from optimsweep.run.life import fail_stale_trials

    spec = ctx.spec
    check_signals()
    with study_lock(ctx.storage_url, spec.name):
        fail_stale_trials(study, tracker, ctx)
        counted = counted_trials(study)
        if len(counted) >= ctx.n_trials:
            return WAIT if _others_running(study, counted) else None
        trials = study.get_trials(deepcopy=False)
        grid = spec.sampler.get("name") == "grid"
        pending = None
        if not any(t.state == TrialState.WAITING for t in trials):
            pending = _next_enqueued(trials, spec)
            if pending is None and grid:
                point = _uncovered_grid_point(study, spec)
                if point is None:
                    return WAIT if _others_running(study, counted) else None
                pending = (point, {})
        # A seed per trial number, so that processes sampling one after another never
        # repeat each other, and one process alone is reproducible. QMC keeps one seed:
        # its sequence is shared through the study.
        fixed_order = spec.sampler.get("name") in ("grid", "qmc")
        seed = spec.seed if fixed_order else sampler_seed(spec.seed, len(trials))
        study.sampler = build_sampler(spec.sampler, seed=seed,
                                      grid=grid_space(spec.search_space) if grid else None)
        with held_signals():
            if pending is not None:
                storage_call(study.enqueue_trial, pending[0], user_attrs=pending[1],
                             retry=False)
            trial = storage_call(study.ask, retry=False)
            if is_heartbeat_enabled(study._storage):  # its first beat, before anything else
                storage_call(study._storage.record_heartbeat, trial._trial_id, retry=False)
            storage_call(trial.set_user_attr, "host", socket.gethostname(), retry=False)
            storage_call(trial.set_user_attr, "pid", os.getpid(), retry=False)
            LIVE.add(trial._trial_id)  # run_group lets go of it
    tracker.reopen(ctx.parent_run_id)  # another process may have closed it meanwhile
    return trial


def claim_trials(study: optuna.Study, ctx: StudyContext, tracker: Tracker, k: int):
    """Up to `k` trials, claimed one by one (each under the lock, so the budget holds);
    None or WAIT as claim_trial says when not even one can be had."""
    trials = []
    try:
        while len(trials) < k:
            trial = claim_trial(study, ctx, tracker)
            if trial is None or trial is WAIT:
                return trials or trial
            trials.append(trial)
    except BaseException:
        for trial in trials:  # never to run: the repair fails them as this process's
            LIVE.discard(trial._trial_id)
        raise
    return trials


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def load_sweep_data(spec: Spec):
    """The data every trial of the sweep trains on, loaded once per process; a data factory
    that fails or returns the wrong thing is the sweep file's error."""
    from optimsweep.core.data import DataError
    from optimsweep.core.train import TrainConfig, load_data
    from optimsweep.core.usercode import UserCodeError

    try:
        return load_data(TrainConfig.from_dict(spec.base_config()))
    except (DataError, UserCodeError) as exc:
        raise SpecError(f"{spec.path}: {exc}") from exc


def run_trials(ctx: StudyContext, *, deadline: float | None = None,
               progress: bool = False, data=None) -> None:
    """Claim and run trials in this process until the budget is used up or the deadline
    (time.time()) passes. Data is loaded once (unless given)."""
    from optimsweep.core.train import default_fuse
    from optimsweep.run.life import run_group

    spec = ctx.spec
    _configure_stores(spec)
    if data is None:
        data = load_sweep_data(spec)
    fuse = default_fuse(data.device) if spec.fuse == "auto" else spec.fuse
    storage = open_storage(ctx.storage_url)
    tracker = Tracker(ctx.tracking_uri)
    study = optuna.load_study(study_name=spec.name, storage=storage,
                              pruner=build_pruner(spec.pruner, epochs=spec.budget.epochs))
    study.stop = lambda: None  # a grid sampler stops studies; here the budget does
    bar = _progress(study, ctx) if progress else None
    try:
        while deadline is None or time.time() < deadline:
            trials = claim_trials(study, ctx, tracker, fuse)
            if trials is None:
                break
            if trials is WAIT:
                time.sleep(min(2.0, RESILIENCE.heartbeat_interval))
                continue
            for trial, outcome in zip(trials, run_group(study, trials, ctx, data, tracker),
                                      strict=True):
                if outcome.state == "failed":
                    _say(f"trial {trial.number} failed: {outcome.error}")
            if bar is not None:
                _update(bar, study, ctx)
    finally:
        if bar is not None:
            bar.close()


def _progress(study: optuna.Study, ctx: StudyContext):
    from tqdm import tqdm

    start = len(counted_trials(study))
    bar = tqdm(total=max(0, ctx.n_trials - start), desc=ctx.spec.name, unit="trial",
               file=sys.stderr)
    bar.start_count = start
    return bar


def _update(bar, study: optuna.Study, ctx: StudyContext) -> None:
    bar.n = min(bar.total, len(counted_trials(study)) - bar.start_count)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        bar.set_postfix_str(f"best: trial {best.number} = {best.value:.4f}")
    bar.refresh()


def run_worker(ctx: StudyContext, deadline: float | None, n_workers: int,
               debug: bool = False) -> None:
    """A worker process: its share of the cores, quiet logs, and an exit code that says how
    it ended (0 done, 128+signal interrupted, 3 a store failed)."""
    import torch

    stop_on_signals(once=True)
    quiet(debug)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    try:
        run_trials(ctx, deadline=deadline)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001  (the parent names this worker; --debug shows why)
        if debug:
            raise
        print(f"error: {describe(exc) if not isinstance(exc, StoreError) else exc}",
              file=sys.stderr)
        sys.exit(3)


def _run_workers(opened: OpenStudy, workers: int, deadline: float | None,
                 progress: bool) -> None:
    mp = multiprocessing.get_context("spawn")
    debug = logging.getLogger("optimsweep").isEnabledFor(logging.DEBUG)
    processes = [mp.Process(target=run_worker, args=(opened.ctx, deadline, workers, debug))
                 for _ in range(workers)]
    for p in processes:
        p.start()
    try:
        bar = _progress(opened.study, opened.ctx) if progress else None
        # is_alive() reaps a dead worker: ask every one, so none stays a zombie whose pid
        # still looks alive to the others' stale-trial check.
        while any([p.is_alive() for p in processes]):
            time.sleep(0.5)
            check_signals()
            if bar is not None:
                _update(bar, opened.study, opened.ctx)
        if bar is not None:
            bar.close()
    finally:  # Ctrl-C or SIGTERM here: every worker closes its own trial, or is killed
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(WORKER_STOP_SECONDS)
            if p.is_alive():
                p.kill()
                p.join()
    problems = []
    for i, p in enumerate(processes):
        if p.exitcode == 0:
            continue
        if p.exitcode < 0:
            how = f"was killed by {signal.Signals(-p.exitcode).name}"
        elif p.exitcode > 128:
            how = f"was stopped by {signal.Signals(p.exitcode - 128).name}"
        else:
            how = f"failed (exit code {p.exitcode}, its error is above)"
        problems.append(f"worker {i} (pid {p.pid}) {how}")
    if not problems:
        return
    repair(opened)  # the trials of the ended workers: failed, not counted
    left = opened.ctx.n_trials - len(counted_trials(opened.study))
    if left <= 0 or (deadline is not None and time.time() >= deadline):
        log.warning("; ".join(problems) + "; its trial was marked failed (interrupted) and "
                    "the other workers finished the sweep")
        return
    raise WorkersFailed("; ".join(problems) + f"; {left} trials of the budget remain: run "
                        "the same command again to finish them")


def _close_study_run(opened: OpenStudy, status: str) -> None:
    """Repair leftovers, close the parent run (unless trials still run in other processes:
    then it stays RUNNING and says so), then write the counts and plots on it. The status
    goes first: it is the smallest write, and the one a full disk must not cost."""
    from optimsweep.plots import log_study_plots

    repair(opened)
    study, tracker, ctx = opened.study, opened.tracker, opened.ctx
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    left = ctx.n_trials - len(counted_trials(study))
    if running:
        note = f"{len(running)} trials still running in other processes"
    elif status == "FINISHED" and left > 0:  # a timeout: only a full budget is FINISHED
        status, note = "KILLED", (f"stopped with {left} of {ctx.n_trials} trials of the "
                                  "budget left; run the sweep again to finish them")
    else:
        note = ""
    tracker.set_tag(ctx.parent_run_id, "optimsweep.note", note)
    if running:
        return  # the summary and plots are the last process's to write
    tracker.set_status(ctx.parent_run_id, status)
    # Workers ending together would each draw the same plots: the first one does.
    finished = f"{len(study.get_trials(deepcopy=False)) - len(running)} trials"
    with study_lock(ctx.storage_url, ctx.spec.name):
        if tracker.tag(ctx.parent_run_id, SUMMARIZED) == finished:
            return
        tracker.set_tag(ctx.parent_run_id, SUMMARIZED, finished)
    log_summary(study, ctx.spec.metric, tracker, ctx.parent_run_id)
    log_study_plots(study, ctx.spec.metric, tracker.client, ctx.parent_run_id)


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
            run_trials(opened.ctx, deadline=deadline, progress=progress, data=data)
        else:
            _run_workers(opened, workers, deadline, progress)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            _close_study_run(opened, status)
        except Exception as exc:
            if status == "FINISHED":  # else the error that stopped the sweep says more
                raise exc if isinstance(exc, StoreError) else StoreError(
                    f"tracking store {redact(opened.tracker.uri)}: {describe(exc)}") from exc
    return opened.study
