"""The records invariant, asserted through Optuna's and MLflow's own APIs, and real
`optimsweep` processes to break it with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from optimsweep.records.schema import State
from optimsweep.records.storage import open_storage

DATA = Path(os.environ.get("OPTIMSWEEP_DATA", Path(__file__).parents[1] / "data")).resolve()


def mlflow_runs(spec, role=None):
    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, [r for r in runs if role is None or r.data.tags["optimsweep.role"] == role]


def load_study(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.storage))


def assert_invariant(spec, n_trials: int | None = None):
    """Every trial has exactly one child run in the matching state, with its params; nothing
    is RUNNING; one parent run; the counted trials never exceed the budget."""
    client, children = mlflow_runs(spec, "trial")
    (parent,) = mlflow_runs(spec, "study")[1]
    trials = load_study(spec).trials
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(
        r.info.run_id for r in children)
    by_id = {r.info.run_id: r for r in children}
    for trial in trials:
        assert trial.state.is_finished(), f"trial {trial.number} is {trial.state.name}"
        state = State.of_trial(trial)
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optimsweep.trial_number"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (run.info.status, run.data.tags["optimsweep.state"]) == (state.run_status,
                                                                        state.word)
        for name, value in trial.params.items():
            assert run.data.params[name] == str(value)
        if trial.state.name == "COMPLETE":
            history = client.get_metric_history(run.info.run_id, spec.metric)
            assert history[-1].value == pytest.approx(trial.value)
    assert parent.info.status != "RUNNING"
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(spec, "confirm")[1])
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) <= (n_trials or spec.budget.n_trials)
    return client, children, trials


def start(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`optimsweep ARGS` as a user runs it, in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "optimsweep.cli", *map(str, args)], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OPTIMSWEEP_DATA": str(DATA), **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_until(predicate, timeout: float = 60, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001  (a store still being created by the process)
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial(spec, with_run: bool = True):
    """The first RUNNING trial (that already has its MLflow run), or None."""
    for t in load_study(spec).get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.RUNNING,)):
        if not with_run or "mlflow_run_id" in t.user_attrs:
            return t
    return None


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`optimsweep ARGS` in this process (where no separate process is needed)."""
    from optimsweep.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
