"""After the sweep: plots on the parent run, `best`, `export` -> `train` reproduces,
the tutorial class loads the weights, and `confirm` re-ranks across fresh seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from core_helpers import make_regression
from optimsweep.cli import main
from optimsweep.confirm import confirm
from optimsweep.core.train import TrainConfig, fit, load_data
from optimsweep.export import export_best
from optimsweep.run.runner import run_sweep
from optimsweep.run.study import open_existing
from serving import invocations, served
from sweeps import fashion_sweep, line_sweep, load
from test_models import TutorialNeuralNetwork


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Three real FashionMNIST trials on 1k images; returns the sweep file's path. Run once
    for the module: the tests using it only read the study and export into their own
    tmp_path."""
    path = fashion_sweep(tmp_path_factory.mktemp("tiny_study"))
    run_sweep(load(path), progress=False)
    return path


def test_parent_run_carries_curves_and_optuna_plots(tmp_path):
    spec = load(line_sweep(tmp_path, budget={"n_trials": 4, "epochs": 3}))
    study = run_sweep(spec, progress=False)
    client = MlflowClient(spec.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    names = {a.path for a in client.list_artifacts(parent, "plots")}
    assert names == {"plots/val_curves.png", "plots/optimization_history.html",
                     "plots/param_importances.html", "plots/parallel_coordinate.html"}
    png = client.download_artifacts(parent, "plots/val_curves.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    html = open(client.download_artifacts(parent, "plots/optimization_history.html",
                                          str(tmp_path))).read()
    # Opens offline: plotly.js is embedded, and no script is fetched from elsewhere.
    assert len(html) > 1_000_000 and not re.search(r"<script[^>]*src=[\"']https?:", html)


def test_best_prints_the_top_trials_with_their_run_ids(tiny_study, capsys):
    assert main(["best", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    study = open_existing(tiny_study).study
    assert "study 'tiny'" in out and study.best_trial.user_attrs["mlflow_run_id"] in out
    assert all(re.search(rf"^\s*{t.number}\s+complete", out, re.M) for t in study.trials)


def test_export_then_train_reproduces_the_trial(tiny_study, tmp_path, capsys):
    """The exported config, trained again on CPU with its seed, gives the same metrics."""
    assert main(["export", str(tiny_study), "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "best single-seed trial" in out
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    study = open_existing(tiny_study).study
    assert metrics["trial"] == study.best_trial.number
    assert metrics["mlflow_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert "git_commit" in metrics["provenance"]["trained_with"]
    config_text = (tmp_path / "best" / "config.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert {"task", "model", "optimizer", "lr", "batch_size", "epochs", "seed", "val_size",
            "split_seed", "train_subset"} <= set(config)

    again = TrainConfig.from_dict({**config, "device": "cpu"})
    result = fit(again, load_data(again))
    assert result.final.val_accuracy == metrics["final_epoch"]["val_accuracy"]
    assert result.test_accuracy == metrics["final_epoch"]["test_accuracy"]

    assert main(["train", "--config", str(tmp_path / "best" / "config.yaml"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"Accuracy: {100 * metrics['final_epoch']['test_accuracy']:.1f}%" in printed


def test_the_registered_winner_serves_what_the_tutorial_class_computes(tiny_study, tmp_path):
    """`export` registers the winner; MLflow's own clients load it by alias, and a real
    `mlflow models serve` that can't import optimsweep answers as the tutorial's class with
    the exported state_dict does."""
    import mlflow

    done = export_best(open_existing(tiny_study), tmp_path / "best")
    model = TutorialNeuralNetwork()
    model.load_state_dict(torch.load(done.folder / "state_dict.pt", weights_only=True))
    images = load_data(TrainConfig(train_subset=10, val_size=1000)).test_x[:64]
    with torch.no_grad():
        expected = model(images).numpy()
    registered, tracking_uri = done.registered, load(tiny_study).tracking_uri
    assert (registered.name, registered.alias) == ("tiny", "champion")
    assert registered.uri == "models:/tiny@champion"

    with mlflow.tracking._tracking_service.utils._use_tracking_uri(tracking_uri):
        loaded = mlflow.pyfunc.load_model("models:/tiny@champion")
        version = MlflowClient(tracking_uri).get_model_version_by_alias("tiny", "champion")
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)
    assert loaded.metadata.get_input_schema().inputs[0].type == np.dtype("float32")
    assert np.abs(loaded.predict(images.numpy()) - expected).max() < 1e-3
    assert version.run_id == done.trial.user_attrs["mlflow_run_id"]
    assert version.tags["optimsweep.trial_number"] == str(done.trial.number)
    assert float(version.tags["optimsweep.selection_value"]) == done.trial.value
    assert {"optimsweep.sweep_fingerprint", "test_accuracy", "val_accuracy"} <= set(
        version.tags)

    src = Path(__file__).parent.parent / "src"
    with served("models:/tiny@champion", tracking_uri, tmp_path / "serve",
                blocked=("optimsweep",), hidden=(str(src),)) as url:
        answer = invocations(url, images.numpy())
    assert (answer.argmax(1) == expected.argmax(1)).all()
    assert np.abs(answer - expected).max() < 1e-3


def test_export_by_study_name_uses_the_default_stores(tiny_study, tmp_path, monkeypatch):
    spec = load(tiny_study)
    monkeypatch.setenv("OPTIMSWEEP_STORAGE", spec.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", spec.tracking_uri)
    done = export_best(open_existing("tiny"), tmp_path / "by-name")
    assert (done.folder / "state_dict.pt").is_file()


# A config that overshoots the seed's line and oscillates around it: now and then a seed
# leaves it closer than a steady config, which is better on average.
LUCKY = {"optimizer": "sgd", "lr": 0.3, "batch_size": 16}
STEADY = {"optimizer": "sgd", "lr": 0.03, "batch_size": 16}


def _val_loss(seed: int, params: dict, line) -> float:
    config = TrainConfig(task="regression", model="linear", epochs=3, seed=seed, **params)
    return fit(config, line).final.val_loss


def test_confirm_logs_k_by_s_runs_and_changes_the_export(tmp_path):
    line = make_regression()
    lucky_seed = next(s for s in range(500)
                      if _val_loss(s, LUCKY, line) < _val_loss(s, STEADY, line))
    space = {"optimizer": {"type": "categorical", "choices": ["sgd"]},
             "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
             "batch_size": {"type": "categorical", "choices": [16]}}
    spec = load(line_sweep(tmp_path, seed=lucky_seed, search_space=space,
                           budget={"n_trials": 2, "epochs": 3}, baseline=[LUCKY, STEADY]))
    study = run_sweep(spec, progress=False)
    assert study.best_trial.number == 0  # the lucky config wins the single-seed sweep
    opened = open_existing(spec.path)
    assert export_best(opened, tmp_path / "before").trial.number == 0

    results = confirm(opened, top_k=2, seeds=5, log=lambda msg: None)

    client = MlflowClient(spec.tracking_uri)
    runs = client.search_runs([study.user_attrs["mlflow_experiment_id"]],
                              "tags.`optimsweep.role` = 'confirm'")
    assert len(runs) == 2 * 5
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {
        study.user_attrs["mlflow_parent_run_id"]}
    assert lucky_seed not in {int(r.data.tags["optimsweep.seed"]) for r in runs}
    assert [c.trial for c in results] == [1, 0] and results[0].mean < results[1].mean
    done = export_best(open_existing(spec.path), tmp_path / "after")
    assert done.trial.number == 1
    assert "confirmed winner over 5 fresh seeds" in done.reason
    assert "single-seed best was trial 0" in done.reason
    # The registry compares the confirmed mean, and says so on the version.
    version = client.get_model_version(done.registered.name, done.registered.version)
    assert float(version.tags["optimsweep.selection_value"]) == results[0].mean
    assert version.tags["optimsweep.confirmed"] == \
        f"{results[0].mean:.4f} ± {results[0].std:.4f}"


def test_export_never_replaces_a_folder_of_other_files(tiny_study, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my_model.pt").write_bytes(b"precious")
    assert main(["export", str(tiny_study), "--out", str(mine)]) == 2
    assert "holds other files (my_model.pt)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["my_model.pt"]
    assert main(["export", str(tiny_study), "--out", str(tmp_path / "best")]) == 0
    assert main(["export", str(tiny_study), "--out", str(tmp_path / "best")]) == 0  # again
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "config.yaml", "metrics.json", "state_dict.pt"]


def test_export_warns_when_the_winner_is_the_baseline(tmp_path, capsys):
    """The search offers only the baseline's learning rate and one far too small to learn
    in 2 epochs: the baseline wins (a tie goes to the earlier trial), and export says the
    search found nothing better."""
    path = line_sweep(tmp_path, budget={"n_trials": 3, "epochs": 2},
                      search_space={"optimizer": "sgd", "batch_size": 16,
                                    "lr": {"type": "categorical", "choices": [1e-6, 0.05]}},
                      baseline=[{"lr": 0.05}])
    run_sweep(load(path), progress=False)
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: the winner, trial 0, is the study's baseline" in err


NOISE = '''
import torch


def load(n=1500):
    """Inputs that say nothing of the labels; 80% of the labels are class 0."""
    g = torch.Generator().manual_seed(0)
    def part(n):
        return torch.randn(n, 8, generator=g), (torch.rand(n, generator=g) < 0.2).long() * 2
    return part(n), part(300)
'''


def test_export_warns_when_the_winner_is_no_better_than_chance(tmp_path, capsys):
    """No config can learn labels the inputs don't predict: the best validation accuracy is
    that of always guessing the commonest class, and export says so."""
    (tmp_path / "noise.py").write_text(NOISE)
    path = line_sweep(tmp_path, "noise", budget={"n_trials": 2, "epochs": 2},
                      task=None, model={"factory": "torch.nn:Linear",
                                        "kwargs": {"in_features": 8, "out_features": 3}},
                      data={"factory": "noise:load", "val_size": 500},
                      loss="cross_entropy", metric="val_accuracy",
                      search_space={"optimizer": "adam", "batch_size": 64,
                                    "lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    doc = yaml.safe_load(path.read_text())
    doc.pop("task")
    path.write_text(yaml.safe_dump(doc))
    run_sweep(load(path), progress=False)
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "validation accuracy: no better than chance (always guessing the commonest class" \
        in err
