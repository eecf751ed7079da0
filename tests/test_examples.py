"""The examples/ packages, each swept, exported, reproduced with `train --config`, and its
exported state_dict loaded into the example's own class."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from optimsweep.cli import main
from optimsweep.run.study import open_existing
from serving import invocations, served

EXAMPLES = Path(__file__).parent.parent / "examples"
SRC = Path(__file__).parent.parent / "src"


def example_copy(tmp_path: Path, name: str, budget: dict, data: dict | None = None) -> Path:
    """The example's folder as a user has it, its sweep shrunk to a test's budget and its
    stores put in tmp_path."""
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    path = folder / "sweep.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["budget"] = budget
    if data:
        doc["data"] = {**doc["data"], **data, "kwargs": {**doc["data"].get("kwargs", {}),
                                                         **data.get("kwargs", {})}}
    doc["storage"] = str(tmp_path / "stores" / "optuna.journal")
    doc["tracking_uri"] = f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def own_class(folder: Path, module: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{module}_again", folder / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, name)


def sweep_export_reproduce(path: Path, tmp_path: Path, capsys) -> tuple[dict, dict, str]:
    assert main(["sweep", str(path), "--no-progress"]) == 0
    opened = open_existing(path)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in opened.study.trials)
    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(out / "config.yaml"), "--device", "cpu"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    return config, json.loads((out / "metrics.json").read_text()), capsys.readouterr().out


def test_the_seeds_linear_regression_as_a_package(tmp_path, capsys):
    path = example_copy(tmp_path, "linear_regression", {"n_trials": 2, "epochs": 20})
    config, metrics, trained = sweep_export_reproduce(path, tmp_path, capsys)
    assert config["task"] == "linreg:line" and config["loss"] == "l1"
    assert f"Avg loss: {metrics['final_epoch']['test_loss']:.6f}" in trained  # reproduced
    model = own_class(path.parent, "linreg", "LinearRegressionModel")()
    model.load_state_dict(torch.load(tmp_path / "export" / "state_dict.pt", weights_only=True))
    assert metrics["val_loss"] < 0.05  # the seed's line, found: weights near 0.7 and 0.3
    assert model.weights.item() == pytest.approx(0.7, abs=0.1)
    assert model.bias.item() == pytest.approx(0.3, abs=0.1)


@pytest.mark.learning
def test_the_seeds_cnn_on_fashion_mnist_as_a_package(tmp_path, capsys):
    path = example_copy(tmp_path, "fashion_cnn", {"n_trials": 2, "epochs": 1},
                        data={"kwargs": {"n_train": 1000, "n_test": 300}, "val_size": 300})
    config, metrics, trained = sweep_export_reproduce(path, tmp_path, capsys)
    assert "model.hidden" in config and config["model.num_classes"] == 10
    accuracy = metrics["final_epoch"]["test_accuracy"]
    assert f"Accuracy: {100 * accuracy:.1f}%" in trained  # reproduced
    net = own_class(path.parent, "fashion_cnn", "Net")(hidden=config["model.hidden"])
    net.load_state_dict(torch.load(tmp_path / "export" / "state_dict.pt", weights_only=True))
    x, y = next(iter(torch.utils.data.DataLoader(
        own_class(path.parent, "fashion_cnn", "load")(n_train=1, n_test=300)[1],
        batch_size=300)))
    with torch.no_grad():
        logits = net(x)
        assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(accuracy,
                                                                               abs=1e-6)
    # The user's data factory names the datasets each run trained, validated and tested on.
    client = MlflowClient(f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    inputs = client.get_run(metrics["mlflow_run_id"]).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == [
        "fashion_cnn:load:test", "fashion_cnn:load:train", "fashion_cnn:load:validation"]
    # Registered by the export, it serves where neither optimsweep nor the example's
    # folder can be imported: the model is a traced graph, not a pickled class.
    with served("models:/fashion-cnn@champion", f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}",
                tmp_path / "serve", blocked=("optimsweep", "fashion_cnn"),
                hidden=(str(SRC), str(path.parent), str(EXAMPLES))) as url:
        answer = invocations(url, x[:100].numpy())
    assert np.abs(answer - logits[:100].numpy()).max() < 1e-3
