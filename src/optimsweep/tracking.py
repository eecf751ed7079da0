"""MLflow records through the client API: one experiment and parent run per study, one
child run per trial with its params, per-epoch curves, state_dict, config and real state."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from optimsweep.artifacts import save_state_dict
from optimsweep.provenance import provenance
from optimsweep.train import EpochStats, FitResult, TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
ROLE, STUDY, TRIAL, STATE = ("optimsweep.role", "optimsweep.study", "optimsweep.trial_number",
                             "optimsweep.state")
# The trial's real outcome, as MLflow's run status (state is also a tag, in Optuna's words).
RUN_STATUS = {"running": "RUNNING", "complete": "FINISHED", "pruned": "KILLED",
              "failed": "FAILED"}
STATE_DICT = "state_dict.pt"
CONFIG_FILE = "config.yaml"

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# One small state_dict per download: a progress bar is only noise between our own lines.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


class Tracker:
    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        # Without the kind tag MLflow 3's UI opens experiments in its GenAI (traces) view.
        return self.client.create_experiment(
            name, artifact_location=_artifact_location(self.uri),
            tags={"mlflow.experimentKind": "custom_model_development"})

    def runs(self, experiment_id: str, role: str, extra: str = "") -> list:
        query = f"tags.`{ROLE}` = '{role}'" + (f" and {extra}" if extra else "")
        return list(self.client.search_runs([experiment_id], query, max_results=50_000))

    def study_run(self, experiment_id: str, study_name: str, *, sweep_text: str,
                  sweep_file: str, tags: dict) -> str:
        """The study's parent run, created once and reopened when the study resumes."""
        found = self.runs(experiment_id, "study", f"tags.`{STUDY}` = '{study_name}'")
        all_tags = {ROLE: "study", STUDY: study_name, **tags, **provenance()}
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, tags={ROLE: "study", STUDY: study_name},
                                            run_name=f"study {study_name}").info.run_id
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        self.client.log_text(run_id, sweep_text, f"sweep/{Path(sweep_file).name}")
        return run_id

    def start_trial(self, experiment_id: str, parent_run_id: str, study_name: str,
                    trial_number: int, config: TrainConfig, sampled: dict,
                    tags: dict | None = None, role: str = "trial",
                    run_name: str | None = None) -> str:
        """A child run of the study's parent run: role "trial" (one per Optuna trial) or
        "confirm" (a re-training of a trial's config with another seed)."""
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or f"trial {trial_number:03d}",
            tags={"mlflow.parentRunId": parent_run_id, ROLE: role, STUDY: study_name,
                  TRIAL: str(trial_number), STATE: "running",
                  "optimsweep.sampled": ",".join(sorted(sampled)),
                  **(tags or {}), **provenance()},
        )
        params = [Param(k, str(v)) for k, v in config.active_params().items()]
        self.client.log_batch(run.info.run_id, params=params)
        self.client.log_text(run.info.run_id, config_yaml(config), CONFIG_FILE)
        return run.info.run_id

    def log_epoch(self, run_id: str, stats: EpochStats) -> None:
        now = int(time.time() * 1000)
        values = {"train_loss": stats.train_loss, "val_loss": stats.val_loss,
                  "val_accuracy": stats.val_accuracy, "lr": stats.lr,
                  "epoch_seconds": stats.seconds}
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, stats.epoch)
                                               for k, v in values.items() if v is not None])

    def log_result(self, run_id: str, result: FitResult) -> None:
        """Final test metrics and the final state_dict (written atomically, then copied)."""
        now = int(time.time() * 1000)
        step = len(result.history)
        metrics = [Metric("test_loss", result.test_loss, now, step)]
        if result.test_accuracy is not None:
            metrics.append(Metric("test_accuracy", result.test_accuracy, now, step))
        self.client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifact(run_id, save_state_dict(result.model, Path(tmp) / STATE_DICT))

    def finish_trial(self, run_id: str, state: str, error: str | None = None) -> None:
        tags = [RunTag(STATE, state)] + ([RunTag("optimsweep.error", error[:5000])]
                                         if error else [])
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, RUN_STATUS[state])
