"""A study's records, opened: created or resumed with its MLflow parent run (refusing stores
that lost the study), attached to by a worker process, opened read-only by `best`,
`confirm` and `export`, and the parent run closed with the study's summary."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optimsweep.core.train import TrainConfig, load_data
from optimsweep.errors import DataError, SpecError, StoreError, UserCodeError
from optimsweep.records.optuna_adapter import never_stops
from optimsweep.records.schema import Attr, Tag, counted_trials, is_paused
from optimsweep.records.storage import StudyStorage, is_journal, resolve_storage
from optimsweep.records.tracking import Tracker, resolve_tracking_uri
from optimsweep.report import log_summary, state_counts
from optimsweep.run.context import OpenStudy, StudyRef
from optimsweep.run.repair import reconcile, repair
from optimsweep.sweep.check import load_spec, parse_spec
from optimsweep.sweep.samplers import build_pruner
from optimsweep.sweep.spec import NAME_PATTERN, Spec
from optimsweep.util.urls import redact, redact_text

log = logging.getLogger("optimsweep")


def _check_fingerprint(study: optuna.Study, spec: Spec) -> None:
    known = study.user_attrs.get(Attr.FINGERPRINT)
    if known is not None and known != spec.fingerprint():
        raise SpecError(
            f"{spec.path}: name: study {spec.name!r} already exists with a different task, "
            "search space, metric or fixed values; its trials would not be comparable. Give "
            "this sweep a new name (or delete the old study).")


def _lost_records(study: optuna.Study, spec: Spec, uri: str) -> StoreError:
    return StoreError(
        f"tracking store {redact(uri)} has no record of study {spec.name!r} (its parent run "
        f"{study.user_attrs[Attr.PARENT_RUN_ID]} is missing): it was deleted or replaced "
        "after the study began. Restore it, point tracking_uri at the store the study used, "
        "or give the sweep a new name")


def _open_tracking(study: optuna.Study | None, spec: Spec) -> Tracker:
    """The study's tracking store, refusing one that lost the study's records (mlflow.db
    deleted or replaced), or whose parent run is another same-named study's: carrying on
    would leave trials whose weights can't be found. A missing SQLite file is refused
    before it would be created anew."""
    uri = resolve_tracking_uri(spec.tracking_uri)
    parent = study.user_attrs.get(Attr.PARENT_RUN_ID) if study is not None else None
    if parent and uri.startswith("sqlite:///") and \
            not Path(uri.removeprefix("sqlite:///")).is_file():
        raise _lost_records(study, spec, uri)
    tracker = Tracker(uri, store_timeout=spec.resilience.store_timeout)
    run = tracker.run(parent) if parent else None
    if parent and (tracker.experiment_id(spec.name, create=False) is None or run is None):
        raise _lost_records(study, spec, uri)
    uid, theirs = (study.user_attrs.get(Attr.STUDY_UID) if study is not None else None,
                   run.data.tags.get(Tag.STUDY_UID) if run is not None else None)
    if uid and theirs and uid != theirs:
        raise StoreError(
            f"tracking store {redact(uri)}: the parent run {parent} of study {spec.name!r} "
            "belongs to another study of that name (its identity differs): the study storage "
            "or the tracking store was replaced. Restore the one the study used, or give the "
            "sweep a new name")
    return tracker


def _existing_tracker(spec: Spec) -> Tracker | None:
    """The tracking store, if it exists: a SQLite file that doesn't is not created."""
    uri = resolve_tracking_uri(spec.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return Tracker(uri, store_timeout=spec.resilience.store_timeout)


def _refuse_records_without_study(tracker: Tracker, spec: Spec, storage_url: str) -> None:
    """A new study is never created over an earlier one's records: the study storage has
    no study of this name, but the tracking store holds its parent run with child runs (a
    journal deleted or replaced). Its repair would find runs of no trial."""
    found = tracker.study_records(spec.name)
    if found is not None and found[1]:
        raise StoreError(
            f"study storage {redact(storage_url)} has no study {spec.name!r}, but tracking "
            f"store {redact(tracker.uri)} holds its records (parent run {found[0]} with "
            f"{found[1]} runs): the study storage lost them (deleted or replaced?). Restore "
            "it, or give the sweep a new name; nothing was created")


def _load(storage: StudyStorage, spec: Spec) -> optuna.Study:
    """The study with the sweep file's pruner. The sampler is set per claim (claim.py)."""
    study = optuna.load_study(study_name=spec.name, storage=storage.optuna,
                              pruner=build_pruner(spec.pruner, epochs=spec.budget.steps))
    return never_stops(study)


def open_study(spec: Spec, *, workers: int = 1, n_trials: int | None = None) -> OpenStudy:
    """Create or resume the study and its MLflow parent run, and repair what an earlier
    command left behind. Everything is checked before anything is created."""
    storage_url = resolve_storage(spec.storage)
    if workers > 1 and storage_url.startswith("sqlite"):
        raise SpecError(f"{spec.path}: storage: SQLite can't serve {workers} parallel workers; "
                        "use a journal file path (the default) or a PostgreSQL URL")
    if is_journal(storage_url) and not Path(storage_url).exists():
        tracker = _existing_tracker(spec)  # a journal lost under its records is not made anew
        if tracker is not None:
            _refuse_records_without_study(tracker, spec, storage_url)
    storage = StudyStorage(storage_url, spec.resilience)
    sweep_text = redact_text(spec.text)  # a password written in the file is not kept
    with storage.lock(spec.name):
        try:
            study = _load(storage, spec)
        except KeyError:
            study = None
        if study is not None:
            _check_fingerprint(study, spec)
        tracker = _open_tracking(study, spec)
        if study is None:
            _refuse_records_without_study(tracker, spec, storage_url)
            optuna.create_study(study_name=spec.name, storage=storage.optuna,
                                direction=spec.direction)
            study = _load(storage, spec)
            study.set_user_attr(Attr.FINGERPRINT, spec.fingerprint())
            study.set_user_attr(Attr.SWEEP_FILE, str(spec.path))
            study.set_user_attr(Attr.SWEEP_TEXT, sweep_text)  # `export STUDY` needs no file
        if Attr.STUDY_UID not in study.user_attrs:  # new, or made by an earlier version
            study.set_user_attr(Attr.STUDY_UID, uuid.uuid4().hex)
        uid = study.user_attrs[Attr.STUDY_UID]
        experiment_id = tracker.experiment_id(spec.name)
        parent = tracker.study_run(
            experiment_id, spec.name, sweep_text=sweep_text, sweep_file=str(spec.path),
            tags={Tag.SAMPLER: spec.sampler.get("name", "tpe"),
                  Tag.SAMPLER_OPTIONS: str(spec.sampler),
                  Tag.PRUNER: spec.pruner.get("name", "median"),
                  Tag.PRUNER_OPTIONS: str(spec.pruner),
                  Tag.METRIC: f"{spec.direction} {spec.metric}",
                  Tag.STORAGE: redact(storage_url),
                  Tag.HOST: socket.gethostname(), Tag.PID: os.getpid(),  # the last to open it
                  Tag.FINGERPRINT: spec.fingerprint(), Tag.STUDY_UID: uid})
        study.set_user_attr(Attr.EXPERIMENT_ID, experiment_id)
        study.set_user_attr(Attr.PARENT_RUN_ID, parent)
        ref = StudyRef(spec, storage_url, tracker.uri, experiment_id, parent,
                       n_trials or spec.budget.n_trials, uid)
        opened = OpenStudy(ref, study, storage, tracker)
        for note in reconcile(opened):
            log.warning(note)
    return opened


def attach(ref: StudyRef) -> OpenStudy:
    """A worker process's own handle on a study its parent opened."""
    storage = StudyStorage(ref.storage_url, ref.spec.resilience)
    tracker = Tracker(ref.tracking_uri, store_timeout=ref.spec.resilience.store_timeout)
    return OpenStudy(ref, _load(storage, ref.spec), storage, tracker)


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
    if is_journal(storage_url) and not Path(storage_url).is_file():
        raise SpecError(f"no study store at {storage_url}; run `optimsweep sweep FILE` first")
    storage = StudyStorage(storage_url, spec.resilience if spec is not None else None)
    names = optuna.get_all_study_names(storage.optuna)
    if name not in names:
        raise SpecError(f"no study named {name!r} in {redact(storage_url)}; known: "
                        f"{', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage.optuna)
    if spec is None:  # the study keeps the sweep file it was created from
        if Attr.SWEEP_TEXT not in study.user_attrs:
            hint = study.user_attrs.get(Attr.SWEEP_FILE, "sweeps/NAME.yaml")
            raise SpecError(f"study {name!r} does not hold its sweep file; pass the file "
                            f"instead ({hint})")
        spec = parse_spec(study.user_attrs[Attr.SWEEP_TEXT], study.user_attrs[Attr.SWEEP_FILE])
        storage = StudyStorage(storage_url, spec.resilience)
        study = optuna.load_study(study_name=name, storage=storage.optuna)
    _check_fingerprint(study, spec)
    if Attr.PARENT_RUN_ID not in study.user_attrs:
        raise SpecError(f"study {name!r} has no MLflow records yet; run `optimsweep sweep` "
                        "on it first")
    tracker = _open_tracking(study, spec)
    ref = StudyRef(spec, storage_url, tracker.uri, study.user_attrs[Attr.EXPERIMENT_ID],
                   study.user_attrs[Attr.PARENT_RUN_ID], spec.budget.n_trials,
                   study.user_attrs.get(Attr.STUDY_UID))
    return OpenStudy(ref, study, storage, tracker)


def load_sweep_data(spec: Spec):
    """The data every trial of the sweep trains on, loaded once per process; a data factory
    that fails or returns the wrong thing is the sweep file's error."""
    try:
        return load_data(TrainConfig.from_dict(spec.base_config()))
    except (DataError, UserCodeError) as exc:
        raise SpecError(f"{spec.path}: {exc}") from exc


def close_study_run(opened: OpenStudy, status: str) -> None:
    """Repair leftovers, close the parent run (unless trials still run in other processes:
    then it stays RUNNING and says so), then write the counts and plots on it. The status
    goes first: it is the smallest write, and the one a full disk must not cost. A study
    whose journal was lost is not read again: its run is closed FAILED, saying why. A
    study another process already finished (its budget used up) is left as it closed it."""
    study, tracker, ref = opened.study, opened.tracker, opened.ref
    try:
        opened.storage.check_intact()
    except StoreError as exc:
        tracker.set_tag(ref.parent_run_id, Tag.NOTE, str(exc))
        tracker.set_status(ref.parent_run_id, "FAILED")
        return
    repair(opened)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    left = ref.n_trials - len(counted_trials(study))
    paused = [t for t in study.get_trials(deepcopy=False) if is_paused(t)]
    if not running and left <= 0 and tracker.status(ref.parent_run_id) == "FINISHED":
        return  # finished by the worker that ran its last trial, summary and all
    if running:
        note = f"{len(running)} trials still running in other processes"
    elif status == "FINISHED" and left > 0:  # a timeout: only a full budget is FINISHED
        status, note = "KILLED", (f"stopped with {left} of {ref.n_trials} trials of the "
                                  "budget left; run the sweep again to finish them")
    elif status == "FINISHED" and paused:  # so is a study whose paused trials may go on
        status, note = "KILLED", (f"stopped with {len(paused)} trials paused at a rung; run "
                                  "the sweep again to promote them")
    else:
        note = ""
    tracker.set_tag(ref.parent_run_id, Tag.NOTE, note)
    if running:
        return  # the summary and plots are the last process's to write
    tracker.set_status(ref.parent_run_id, status)
    # Workers ending together would each draw the same plots: the first one does.
    finished = ", ".join(f"{n} {state}" for state, n in state_counts(study).items())
    with opened.lock():
        if tracker.tag(ref.parent_run_id, Tag.SUMMARIZED) == finished:
            return
        tracker.set_tag(ref.parent_run_id, Tag.SUMMARIZED, finished)
    log_summary(study, ref.spec.metric, tracker, ref.parent_run_id)
    from optimsweep.plots import log_study_plots  # matplotlib: 1 s of every process's start

    spec = ref.spec
    log_study_plots(study, spec.metric, tracker, ref.parent_run_id,
                    spec.rungs,
                    spec.budget.reports_per_epoch)
