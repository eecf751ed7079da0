"""Running studies: Optuna and MLflow hold the same trials, resume adds none twice,
workers share a study, pruned and diverged trials show their real state."""

from __future__ import annotations

import json
import math
import textwrap

import optuna
import pytest
import torch
import yaml

from core_helpers import make_regression
from optimsweep.core.data import split_digests
from optimsweep.core.models import LinearRegressionModel
from optimsweep.records.storage import open_storage, resolve_storage
from optimsweep.run.runner import run_sweep
from optimsweep.sweep.spec import SpecError
from records import assert_invariant, best_report, load_study, mlflow_runs
from sweeps import fashion_sweep, line_sweep, load


def test_sweep_records_parent_and_child_runs_with_curves_and_weights(tmp_path):
    # the baseline's curve is best at epoch 1, then gets worse
    spec = load(line_sweep(tmp_path, baseline=[{"optimizer": "adam", "lr": 0.1,
                                                "batch_size": 16}]))
    run_sweep(spec, progress=False)
    client, children, trials = assert_invariant(spec)
    (parent,) = mlflow_runs(spec, "study")[1]
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.tags["optimsweep.sampler"] == "random"
    assert "git_commit" in parent.data.tags and "torch" in parent.data.tags
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")] == [
        "sweep/line.yaml"]
    run = children[0]
    assert {"optimizer", "lr", "batch_size", "epochs", "seed", "task"} <= set(run.data.params)
    for metric in ("train_loss", "val_loss", "lr", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [1, 2, 3], metric
    assert "test_loss" in run.data.metrics
    weights = torch.load(client.download_artifacts(run.info.run_id, "state_dict.pt",
                                                   str(tmp_path)), weights_only=True)
    LinearRegressionModel().load_state_dict(weights)
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "task: regression" in open(config).read()
    _assert_best_reports(client, children, trials)
    _assert_leaderboard(client, parent, trials, tmp_path)
    _assert_datasets(children)


def _assert_best_reports(client, children, trials):
    """Each trial's run: best_val_loss and best_epoch, logged at every report as the best so
    far (MLflow sorts on the latest value); the study ranks on val_loss's last report."""
    values = {str(t.number): t.value for t in trials}
    for run in children:
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
        assert run.data.metrics["val_loss"] == values[run.data.tags["optimsweep.trial_number"]]
        assert (run.data.metrics["best_val_loss"], run.data.metrics["best_epoch"]) == \
            best_report(curve, maximize=False)
        best = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                   "best_val_loss")}
        assert best == {step: min(v for s, v in curve.items() if s <= step) for step in curve}
    baseline = next(r for r in children if r.data.tags["optimsweep.trial_number"] == "0")
    assert baseline.data.metrics["best_epoch"] == 1 and \
        baseline.data.metrics["best_val_loss"] < baseline.data.metrics["val_loss"]


def _assert_leaderboard(client, parent, trials, tmp_path):
    """The parent run's leaderboard.json (MlflowClient.log_table): every trial, best first."""
    path = client.download_artifacts(parent.info.run_id, "leaderboard.json", str(tmp_path))
    table = json.loads(open(path).read())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    ranked = sorted(trials, key=lambda t: t.value)
    assert [r["trial"] for r in rows] == [t.number for t in ranked]
    assert [r["run_id"] for r in rows] == [t.user_attrs["mlflow_run_id"] for t in ranked]
    assert [r["state"] for r in rows] == ["complete"] * 4
    assert [r["val_loss"] for r in rows] == pytest.approx([t.value for t in ranked])
    assert [r["test_loss"] for r in rows] == pytest.approx(
        [t.user_attrs["test_loss"] for t in ranked])
    assert all(r["lr"] == pytest.approx(t.params["lr"]) for r, t in zip(rows, ranked, strict=True))


def _assert_datasets(children):
    """Each trial's run has its data as MLflow dataset inputs: the three splits, each with
    its context, the digest of its examples (the same in every trial) and the split seed."""
    digests = split_digests(make_regression())
    for run in children:
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["regression:test", "regression:train",
                                  "regression:validation"]
        for split, name, context, examples in (("train", "train", "training", 800),
                                               ("val", "validation", "validation", 100),
                                               ("test", "test", "test", 100)):
            dataset = inputs[f"regression:{name}"]
            assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context",
                                                                 context)]
            assert dataset.dataset.digest == digests[split][:36]
            profile = json.loads(dataset.dataset.profile)
            assert (profile["split_seed"], profile["examples"], profile["sha256"]) == (
                0, examples, digests[split])
            assert profile["factory"] == "optimsweep.core.tasks:regression"


def test_conditional_params_are_logged_only_when_they_apply(tmp_path):
    spec = load(line_sweep(tmp_path, budget={"n_trials": 9, "epochs": 1}))
    run_sweep(spec, progress=False)
    _, children = mlflow_runs(spec, "trial")
    optimizers = {r.data.params["optimizer"] for r in children}
    assert optimizers == {"sgd", "momentum", "adam"}  # random sampling over 9 trials
    for run in children:
        assert ("momentum" in run.data.params) == (run.data.params["optimizer"] == "momentum")


def test_running_again_resumes_without_duplicates(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 3, "epochs": 2})
    spec = load(path)
    run_sweep(spec, progress=False)
    run_sweep(load(path), progress=False)  # budget already spent: nothing new
    assert len(load_study(spec).trials) == 3
    run_sweep(load(path), n_trials=5, progress=False)  # a bigger budget adds the difference
    client, children, trials = assert_invariant(spec, n_trials=5)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and len(children) == 5
    (parent,) = mlflow_runs(spec, "study")[1]
    board = client.download_artifacts(parent.info.run_id, "leaderboard.json", str(tmp_path))
    assert sorted(row[0] for row in json.loads(open(board).read())["data"]) == [0, 1, 2, 3, 4]
    assert len(optuna.get_all_study_names(open_storage(spec.storage))) == 1


def test_two_workers_finish_a_study_without_losing_or_repeating_trials(tmp_path):
    spec = load(line_sweep(tmp_path, budget={"n_trials": 6, "epochs": 2}))
    run_sweep(spec, workers=2, progress=False)
    _, children, trials = assert_invariant(spec)
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.is_finished() for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # really two processes
    assert len({r.info.run_id for r in children}) == 6


def test_workers_get_the_environment_of_the_sweep_that_starts_them(tmp_path, monkeypatch):
    """The workers' fork server was started before this test set LINE_WEIGHT (with the
    session): a worker still sees it, as a process started anew would."""
    (tmp_path / "env_line.py").write_text(textwrap.dedent("""
        import os

        from optimsweep.core.tasks import regression

        def load():
            return regression(weight=float(os.environ["LINE_WEIGHT"]))
        """))
    monkeypatch.setenv("LINE_WEIGHT", "0.7")
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 1})
    doc = yaml.safe_load(path.read_text())
    del doc["task"]
    path.write_text(yaml.safe_dump({**doc, "data": {"factory": "env_line:load"}, "loss": "l1"}))
    spec = load(path)
    run_sweep(spec, workers=2, progress=False)
    _, _, trials = assert_invariant(spec)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [
        t.user_attrs.get("error") for t in trials]


def test_sqlite_storage_is_refused_for_parallel_workers(tmp_path):
    spec = load(line_sweep(tmp_path, storage=f"sqlite:///{tmp_path}/optuna.db"))
    with pytest.raises(SpecError, match="SQLite can't serve 2 parallel workers"):
        run_sweep(spec, workers=2, progress=False)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("warmup, states", [(0, ["COMPLETE", "PRUNED"]),
                                             (4, ["COMPLETE", "COMPLETE"])],
                         ids=["pruned while epochs remain", "never after the last epoch"])
def test_baseline_runs_first_and_bad_trials_are_pruned(tmp_path, warmup, states):
    """The enqueued baseline is trial 0; a clearly worse config is pruned, but only while
    epochs remain: after the last one, pruning would save nothing and hide a result."""
    spec = load(line_sweep(
        tmp_path, budget={"n_trials": 2, "epochs": 4},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": warmup},
        baseline=[{"optimizer": "adam", "lr": 0.05, "batch_size": 16},
                  {"optimizer": "sgd", "lr": 0.001, "batch_size": 64}]))
    run_sweep(spec, progress=False)
    _, _, trials = assert_invariant(spec)
    assert trials[0].params == {"optimizer": "adam", "lr": 0.05, "batch_size": 16}
    assert [t.state.name for t in trials] == states
    assert trials[1].value is None or trials[1].value > trials[0].value


def test_diverged_trial_fails_and_the_study_goes_on(tmp_path):
    spec = load(fashion_sweep(
        tmp_path, budget={"n_trials": 2, "epochs": 2},
        search_space={"optimizer": {"type": "categorical", "choices": ["momentum", "adam"]},
                      "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e4, "log": True},
                      "momentum": 0.99},
        baseline=[{"optimizer": "momentum", "lr": 1.0e4},
                  {"optimizer": "adam", "lr": 1.0e-3}]))
    study = run_sweep(spec, progress=False)
    _, children, trials = assert_invariant(spec)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "diverged" in trials[0].user_attrs["error"]
    assert study.best_trial.number == 1 and math.isfinite(study.best_value)


def test_a_changed_search_space_is_refused_on_resume(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    run_sweep(load(path), progress=False)
    changed = load(line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 1},
                              search_space={"lr": {"type": "float", "low": 0.1, "high": 0.5}}))
    with pytest.raises(SpecError, match="already exists with a different task, search space"):
        run_sweep(changed, progress=False)
    assert len(load_study(changed).trials) == 1


def test_storage_defaults_to_a_journal_under_mlruns(monkeypatch):
    monkeypatch.delenv("OPTIMSWEEP_STORAGE", raising=False)
    assert resolve_storage(None) == "mlruns/optuna.journal"
    monkeypatch.setenv("OPTIMSWEEP_STORAGE", "postgresql://db/optuna")
    assert resolve_storage("x.journal") == "postgresql://db/optuna"


def test_no_password_written_in_a_sweep_file_is_stored(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    path.write_text(path.read_text() + "# cluster: postgresql://optuna:s3cret@db.lan/studies\n")
    study = run_sweep(load(path), progress=False)
    client, _ = mlflow_runs(load(path))
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    logged = open(client.download_artifacts(parent.info.run_id, "sweep/line.yaml",
                                            str(tmp_path))).read()
    assert "postgresql://optuna:***@db.lan/studies" in logged
    for text in (logged, study.user_attrs["sweep_text"], str(parent.data.tags),
                 str(parent.data.params)):
        assert "s3cret" not in text


def _interrupted(number: int, why: str, retries: int, retry_of: int | None = None):
    attrs = {"interrupted": True, "error": why, "retries": retries}
    if retry_of is not None:
        attrs["retry_of"] = retry_of
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"lr": 0.01},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)},
        user_attrs=attrs)
    trial.number = number
    return trial


def test_a_config_stopped_by_signals_is_run_again_however_often_it_is_preempted(tmp_path):
    """Preempted five times, its config still goes on (from its checkpoint); a config whose
    process died twice (killed, out of memory) is given up after `max_retry`."""
    from optimsweep.records.schema import INTERRUPTED
    from optimsweep.run.claim import next_enqueued

    spec = load(line_sweep(tmp_path))
    preempted = [_interrupted(n, INTERRUPTED, 0, n - 1 if n else None) for n in range(5)]
    params, attrs = next_enqueued(preempted, spec, max_retry=2)
    assert params == {"lr": 0.01} and attrs == {"retry_of": 4, "retries": 0}
    died = "interrupted: its process (pid 7 on host a) ended without closing it"
    killed = [_interrupted(0, died, 0), _interrupted(1, died, 1, 0), _interrupted(2, died, 2, 1)]
    assert next_enqueued(killed, spec, max_retry=2) is None
    assert next_enqueued(killed[:2], spec, max_retry=2)[1] == {"retry_of": 1, "retries": 2}
