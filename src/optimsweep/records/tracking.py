"""MLflow records through the client API: one experiment and parent run per study, one
child run per trial with its params, per-epoch curves, state_dict, config and real state.

Every call that fails for a reason of the store's (a full disk, a database gone, a server
down) raises StoreError naming the store, so callers can tell it from a trial's own failure.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from optimsweep.core.artifacts import save_state_dict
from optimsweep.core.data import split_digests
from optimsweep.core.train import EpochStats, FitResult, TrainConfig
from optimsweep.core.usercode import code_version
from optimsweep.errors import StoreError, chain, describe
from optimsweep.records.schema import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CONFIRM_ROLE,
    LEADERBOARD_FILE,
    STATE_DICT,
    STUDY_ROLE,
    TRACEBACK_FILE,
    TRIAL_ROLE,
    State,
    Tag,
)
from optimsweep.util import signals
from optimsweep.util.atomic import create_sqlite_atomically
from optimsweep.util.provenance import provenance
from optimsweep.util.terminal import quiet_libraries
from optimsweep.util.urls import redact, redact_text

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"

quiet_libraries()  # MLflow's import set its own logger to INFO
# MLflow's settings for a process that writes through a Tracker: one small state_dict per
# download, so a progress bar is only noise between our own lines; and no "View run" link
# for every run a server closes (noise, with the URL's password in it when it has one).
QUIET_MLFLOW = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


# MLflow's own retry of a request to a tracking server: it reads these at each request, and
# only from the environment. They are set for the length of each call (see `store_call`)
# and only where the user did not set them, so no other process inherits them.
_HTTP_RETRY_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT")
_GIVEN_UP_TIMEOUT = 5  # seconds per attempt once the server had its store_timeout


def http_retries(store_timeout: float) -> dict[str, int]:
    """MLflow's retry with exponential backoff (waits 2, 4, 8 ... s) sized to ride out a
    tracking server that is gone for about `store_timeout` seconds; after that the call
    fails and the trial stops uncounted. MLflow's default keeps retrying for minutes."""
    retries = 1
    while 2 ** retries - 2 < store_timeout and retries < 10:
        retries += 1
    timeout = max(5, min(60, int(store_timeout / 2)))  # per attempt, for a server that hangs
    return dict(zip(_HTTP_RETRY_VARS, (retries, 1, timeout), strict=True))


@contextlib.contextmanager
def _environment(values: dict[str, int]) -> Iterator[None]:
    """Set the variables the user did not set, for the block only."""
    added = [var for var in values if var not in os.environ]
    for var in added:
        os.environ[var] = str(values[var])
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


_BATCH_METRICS = 1000  # MLflow's limit on the metrics of one log_batch
# The data's splits (core.data.SPLITS) as MLflow datasets: the name's suffix, and the
# context (tag mlflow.data.context) MLflow's UI filters on.
_DATASET_SPLITS = {"train": ("train", "training"), "val": ("validation", "validation"),
                   "test": ("test", "test")}
_DIGEST_CHARS = 36  # MLflow's dataset digest column holds at most 36 characters


def _epoch_metrics(stats: EpochStats, timestamp: int) -> list[Metric]:
    """One report's curve points: losses, accuracy, learning rate, seconds, user metric;
    with reports within epochs, the step is the report's and `epoch` says how far it was."""
    values = {"train_loss": stats.train_loss, "val_loss": stats.val_loss,
              "val_accuracy": stats.val_accuracy, "lr": stats.lr,
              "epoch_seconds": stats.seconds, **stats.extra,
              "epoch": stats.epochs if stats.reports_per_epoch > 1 else None}
    return [Metric(k, float(v), timestamp, stats.epoch) for k, v in values.items()
            if v is not None]


def _millis(at: float | None = None) -> int:
    """MLflow's timestamp of `at` (a time.time()), or of now."""
    return int((time.time() if at is None else at) * 1000)


def resolve_tracking_uri(spec_uri: str | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or DEFAULT_TRACKING_URI


def _artifact_location(uri: str) -> str | None:
    """Artifacts of the embedded store live beside its database: mlruns/artifacts."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def config_yaml(config: TrainConfig) -> str:
    """A ready-to-run config file: every parameter that affects the run, nothing else."""
    return yaml.safe_dump(config.active_params(), sort_keys=False)


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _migrated_tables(url: str) -> None:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    engine = sqlalchemy.create_engine(url)
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()


def _schema_template() -> Path | None:
    """An empty database with MLflow's tables at this version's schema, made once per
    machine and copied for every new store: MLflow builds its schema in some 60 migrations,
    seconds of work for each new store. None where the cache can't be written."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimsweep"
    template = cache / f"mlflow-{mlflow.__version__}-schema.db"
    try:
        create_sqlite_atomically(template, _migrated_tables)
    except Exception:  # noqa: BLE001  (a read-only home: migrate in place instead)
        return None
    return template


def _initialize_mlflow_db(url: str) -> None:
    template, path = _schema_template(), Path(url.removeprefix("sqlite:///"))
    if template is not None:
        shutil.copyfile(template, path)
        try:  # creates MLflow's default experiment in the copied tables
            MlflowClient(url).search_experiments(max_results=1)
        except Exception:  # noqa: BLE001  (a damaged template: drop it, migrate in place)
            _dispose(url)
            template.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        else:
            return _dispose(url)
    MlflowClient(url).search_experiments(max_results=1)  # creates and migrates the tables
    _dispose(url)


def _dispose(url: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(url, None)
    if engine is not None:  # its file is about to be renamed: no connection may stay open
        engine.dispose()


def store_call(method):
    """Turn any failure of the store into a StoreError that names the store. Ctrl-C waits
    for the call to end (see signals); a server that does not answer is retried as the
    tracker's settings say."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            with signals.held(), _environment(self._http_retries):
                return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if _unreachable(exc):  # it had its time: later calls are tried once, briefly,
                self._http_retries = {  # so the worker stops within about store_timeout
                    **self._http_retries, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0,
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": _GIVEN_UP_TIMEOUT}
            raise StoreError(f"tracking store {redact(self.uri)}: {_problem(self.uri, exc)}"
                             ) from exc

    return call


def _problem(uri: str, exc: BaseException) -> str:
    """What went wrong, in the store's words where they say more than MLflow's wrapper."""
    for cause in chain(exc):
        if isinstance(cause, sqlite3.OperationalError) and "readonly" in str(cause):
            path = uri.removeprefix("sqlite:///")
            return (f"{path} is read-only ({cause}); make it and its folder writable, or "
                    "point tracking_uri at a store this user can write")
    return describe(exc)


def _dataset_race(exc: BaseException) -> bool:
    """Another process inserted the same dataset first (SQLite or PostgreSQL, directly or
    as a tracking server's answer)."""
    text = " ".join(str(e) for e in chain(exc))
    return (("UNIQUE constraint failed: datasets." in text)
            or ("duplicate key" in text and "dataset_pk" in text))


def _unreachable(exc: BaseException | None) -> bool:
    """The server did not answer (refused, reset mid-answer, timed out): MLflow's retries
    were spent on it. Not an answer the server gave, such as a missing run."""
    import requests
    import urllib3

    return any(isinstance(e, requests.exceptions.RequestException
                          | urllib3.exceptions.HTTPError | ConnectionError) for e in chain(exc))


class Tracker:
    """Every MLflow write and read of the project: runs, params, metrics, tags, artifacts.
    `store_timeout`: seconds a tracking server that went away is retried."""

    def __init__(self, tracking_uri: str | None = None, store_timeout: float = 60.0):
        for var, value in QUIET_MLFLOW.items():  # read by MLflow at each call
            os.environ.setdefault(var, value)
        self.uri = resolve_tracking_uri(tracking_uri)
        self._http_retries = http_retries(store_timeout)
        if self.uri.startswith("sqlite:///"):
            try:
                create_sqlite_atomically(self.uri.removeprefix("sqlite:///"),
                                         _initialize_mlflow_db)
            except Exception as exc:
                raise StoreError(f"tracking store {redact(self.uri)}: {describe(exc)}") from exc
        self.client = MlflowClient(self.uri)

    @store_call
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise StoreError(f"tracking store {redact(self.uri)}: experiment {name!r} was "
                             "deleted in MLflow; restore it (`mlflow experiments restore "
                             f"--experiment-id {experiment.experiment_id}`) or rename the study")
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        # Without the kind tag MLflow 3's UI opens experiments in its GenAI (traces) view.
        return self.client.create_experiment(
            name, artifact_location=_artifact_location(self.uri),
            tags={"mlflow.experimentKind": "custom_model_development"})

    @store_call
    def runs(self, experiment_id: str, role: str) -> list:
        """Every live run of one role in the experiment. Values are matched here, not in
        the filter string, so no study name can change what the filter means."""
        found = self.client.search_runs([experiment_id], f"tags.`{Tag.ROLE}` = '{role}'",
                                        max_results=50_000)
        return [r for r in found if r.data.tags.get(Tag.ROLE) == role]

    @store_call
    def study_records(self, study_name: str) -> tuple[str, int] | None:
        """The study's parent run and how many child runs (trials, confirms) it holds, or
        None when the store has no parent run of that name. Creates nothing."""
        experiment = self.client.get_experiment_by_name(study_name)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            return None
        parents = [r for r in self.runs(experiment.experiment_id, STUDY_ROLE)
                   if r.data.tags.get(Tag.STUDY) == study_name]
        if not parents:
            return None
        ids = {r.info.run_id for r in parents}
        children = [r for role in (TRIAL_ROLE, CONFIRM_ROLE)
                    for r in self.runs(experiment.experiment_id, role)
                    if r.data.tags.get(Tag.PARENT) in ids]
        return min(parents, key=lambda r: r.info.start_time).info.run_id, len(children)

    @store_call
    def run(self, run_id: str):
        """The run, or None when the store no longer has it."""
        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if is_missing(exc):
                return None
            raise

    @store_call
    def study_run(self, experiment_id: str, study_name: str, *, sweep_text: str,
                  sweep_file: str, tags: dict) -> str:
        """The study's parent run, created once and reopened when the study resumes. The
        caller holds the study lock, so two processes never both create one."""
        found = [r for r in self.runs(experiment_id, STUDY_ROLE)
                 if r.data.tags.get(Tag.STUDY) == study_name]
        all_tags = {Tag.ROLE: STUDY_ROLE, Tag.STUDY: study_name, **tags, **provenance()}
        if found:
            run_id = min(found, key=lambda r: r.info.start_time).info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id,
                                            tags={Tag.ROLE: STUDY_ROLE, Tag.STUDY: study_name},
                                            run_name=f"study {study_name}").info.run_id
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        self.client.log_text(run_id, sweep_text, f"sweep/{Path(sweep_file).name}")
        return run_id

    @store_call
    def start_run(self, experiment_id: str, parent_run_id: str, study_name: str,
                  trial_number: int, *, role: str = TRIAL_ROLE, run_name: str | None = None,
                  tags: dict | None = None) -> str:
        """A child run of the study's parent run: role "trial" (one per Optuna trial) or
        "confirm" (a re-training of a trial's config with another seed). Host and pid say
        which process owns it, so a later command can close it if that process died."""
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or f"trial {trial_number:03d}",
            tags={Tag.PARENT: parent_run_id, Tag.ROLE: role, Tag.STUDY: study_name,
                  Tag.TRIAL: str(trial_number), Tag.STATE: State.RUNNING.word,
                  Tag.HOST: socket.gethostname(), Tag.PID: str(os.getpid()), **(tags or {}),
                  **provenance()},
        )
        return run.info.run_id

    @store_call
    def log_config(self, run_id: str, config: TrainConfig, sampled: dict) -> None:
        """Every parameter that applies, and config.yaml to rerun it with `train --config`."""
        params = [Param(k, str(v)) for k, v in config.active_params().items()]
        code = [RunTag(f"{Tag.CODE}{role}", f"{ref} = {code_version(ref, config.code_dir)}")
                for role, ref in config.user_code().items()]  # what version trained it
        self.client.log_batch(run_id, params=params, tags=[
            RunTag(Tag.SAMPLED, ",".join(sorted(sampled))), *code])
        self.client.log_text(run_id, config_yaml(config), CONFIG_FILE)

    @store_call
    def log_missing_params(self, run_id: str, params: dict) -> None:
        logged = self.client.get_run(run_id).data.params
        missing = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        if missing:
            self.client.log_batch(run_id, params=missing)

    @store_call
    def log_epoch(self, run_id: str, stats: EpochStats, summary: dict[str, float] | None = None,
                  at: float | None = None) -> None:
        """One report's curve points, and `summary` metrics (best_<metric>, best_epoch) at
        the same step, in one request, dated `at` (a time.time()) or now."""
        now = _millis(at)
        self.client.log_batch(run_id, metrics=_epoch_metrics(stats, now) + [
            Metric(k, float(v), now, stats.epoch) for k, v in (summary or {}).items()])

    @store_call
    def log_steps(self, run_id: str, by_step: dict[int, dict[str, float]]) -> None:
        """Metrics at several steps (the summary of a curve a resumed run continues)."""
        now = _millis()
        metrics = [Metric(k, float(v), now, step) for step, values in by_step.items()
                   for k, v in values.items()]
        for start in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + _BATCH_METRICS])

    def log_datasets(self, run_id: str, data) -> None:
        """The data a run trains on, as MLflow dataset inputs (the UI's Datasets column and
        filters): one per split, named "<task>:<split>", with its digest (core.data:
        split_digests, hashed here, outside the store's call) and what made it."""
        digests = split_digests(data)
        origin = data.origin or {"task": "data", "factory": None, "kwargs": {}}
        inputs = []
        for (split, (suffix, context)), examples in zip(_DATASET_SPLITS.items(), data.sizes,
                                                        strict=True):
            about = {"factory": origin["factory"], "kwargs": origin["kwargs"],
                     "split_seed": data.split_seed}
            dataset = MlflowDataset(
                name=f"{origin['task']}:{suffix}", digest=digests[split][:_DIGEST_CHARS],
                source_type="code",  # CodeDatasetSource's form: {"tags": {...}}
                source=json.dumps({"tags": {**about, "split": suffix}}, default=str),
                profile=json.dumps({"examples": examples, **about, "sha256": digests[split]},
                                   default=str))
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        self._log_inputs(run_id, inputs)

    @store_call
    def _log_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        for attempt in range(3):
            try:
                return self.client.log_inputs(run_id, datasets=inputs)
            except Exception as exc:  # noqa: BLE001
                # MLflow's store looks a dataset up, then inserts it: the first trials of
                # two processes both insert it, and one fails on the unique key. Again, it
                # finds the other's row and links it.
                if attempt == 2 or not _dataset_race(exc):
                    raise
                time.sleep(0.1 * (attempt + 1))

    @store_call
    def log_epochs(self, run_id: str, history: list[EpochStats]) -> None:
        """The curve a resumed run continues: the epochs its checkpoint holds, in as few
        requests as MLflow's batch limit allows."""
        now = _millis()
        metrics = [m for stats in history for m in _epoch_metrics(stats, now)]
        for start in range(0, len(metrics), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + _BATCH_METRICS])

    @store_call
    def log_checkpoint(self, run_id: str, path: Path, epoch: int) -> None:
        """Store a checkpoint with the run (under its own name, so the previous one stays
        whole until this one is), then remove the older ones."""
        self.client.log_artifact(run_id, str(path), CHECKPOINT_DIR)
        for name in self.checkpoints(run_id)[1:]:
            self._artifacts(run_id).delete_artifacts(name)

    @store_call
    def checkpoints(self, run_id: str) -> list[str]:
        """The run's checkpoint files (artifact paths), the latest epoch first."""
        try:
            found = self.client.list_artifacts(run_id, CHECKPOINT_DIR)
        except MlflowException as exc:
            if is_missing(exc):
                return []
            raise
        return sorted((f.path for f in found if not f.is_dir and f.path.endswith(".pt")),
                      key=lambda path: int("".join(c for c in path if c.isdigit()) or 0),
                      reverse=True)  # by number: epoch-10000 is newer than epoch-9999

    @store_call
    def delete_checkpoints(self, run_id: str) -> None:
        if self.checkpoints(run_id):
            self._artifacts(run_id).delete_artifacts(CHECKPOINT_DIR)

    def _artifacts(self, run_id: str):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.client.get_run(run_id).info.artifact_uri,
                                       tracking_uri=self.uri)

    @store_call
    def log_result(self, run_id: str, result: FitResult, at: float | None = None) -> None:
        """Final test metrics, dated `at` (a time.time()) or now, and the final state_dict
        (written atomically, then copied)."""
        now = _millis(at)
        step = len(result.history)
        metrics = [Metric("test_loss", result.test_loss, now, step)]
        if result.test_accuracy is not None:
            metrics.append(Metric("test_accuracy", result.test_accuracy, now, step))
        metrics += [Metric(k, v, now, step) for k, v in result.test_extra.items()]
        self.client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifact(run_id, save_state_dict(result.model, Path(tmp) / STATE_DICT))

    @store_call
    def finish_run(self, run_id: str, state: State, error: str | None = None,
                   traceback: str | None = None) -> None:
        """Close a run in its trial's real state, with the reason when it failed. A paused
        run is not closed: it waits SCHEDULED (no end time) until it is promoted."""
        tags = [RunTag(Tag.STATE, state.word)] + (
            [RunTag(Tag.ERROR, redact_text(error)[:5000])] if error else [])
        self.client.log_batch(run_id, tags=tags)
        if traceback:
            try:  # the reason is already on the run; the traceback is a bonus a full disk
                self.client.log_text(run_id, redact_text(traceback), TRACEBACK_FILE)  # may refuse
            except Exception:  # noqa: BLE001
                pass
        if state == State.PAUSED:
            self.client.update_run(run_id, status=state.run_status)
        else:
            self.client.set_terminated(run_id, state.run_status)

    @store_call
    def resume_run(self, run_id: str) -> None:
        """A paused trial's run, promoted: RUNNING again, owned by this process."""
        self.client.update_run(run_id, status=State.RUNNING.run_status)
        self.client.log_batch(run_id, tags=[
            RunTag(Tag.STATE, State.RUNNING.word), RunTag(Tag.HOST, socket.gethostname()),
            RunTag(Tag.PID, str(os.getpid()))])

    @store_call
    def tag(self, run_id: str, key: str) -> str | None:
        return self.client.get_run(run_id).data.tags.get(key)

    @store_call
    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    @store_call
    def download(self, run_id: str, artifact: str, folder: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, artifact, str(folder)))

    @store_call
    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (the study's run, when a worker picks up a trial after
        another process closed it)."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    @store_call
    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    @store_call
    def set_status(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status)

    @store_call
    def delete_run(self, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, Tag.ERROR, reason)
        self.client.set_terminated(run_id, "FAILED")
        self.client.delete_run(run_id)

    @store_call
    def log_summary(self, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """A study's counts and best trial, on its parent run."""
        now = _millis()
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])

    @store_call
    def log_leaderboard(self, run_id: str, table) -> None:
        """The study's trials as a table (a pandas DataFrame) on its parent run, shown in
        MLflow's UI as a table. Written as `MlflowClient.log_table` writes one (JSON in
        pandas' split form, and the run's `mlflow.loggedArtifacts` tag), but replaced whole:
        log_table reads, appends and writes back a table already there, so two processes
        ending one study at once would duplicate rows or fail on each other's file."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / LEADERBOARD_FILE
            table.to_json(path, orient="split", index=False, date_format="iso")
            self.client.log_artifact(run_id, str(path))
        entry = {"path": LEADERBOARD_FILE, "type": "table"}
        logged = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS)
                            or "[]")
        if entry not in logged:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

    @store_call
    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)
