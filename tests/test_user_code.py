"""Your own model and data: a package outside the project, named in the sweep file by import
strings, swept, exported, reproduced, and loaded back into the package's own class."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from optimsweep.cli import main
from optimsweep.core.train import LOSSES, TrainConfig, fit, load_data
from optimsweep.run.study import open_existing
from optimsweep.sweep.check import load_spec
from records import finish, launch

DATA = '''
import torch
from torch.utils.data import TensorDataset


def load(n_train=1200, n_test=300, features=8, classes=3, seed=0, as_datasets=False):
    """Gaussian blobs: one cluster per class."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2

    def part(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return centers[y] + torch.randn(n, features, generator=g), y

    train, test = part(n_train), part(n_test)
    if as_datasets:
        return TensorDataset(*train), TensorDataset(*test)
    return train, test


def wrong_shape():
    return torch.zeros(10, 8), torch.zeros(10)


def with_nan():
    (x, y), test = load(n_train=1200)
    x[::240, 0] = float("nan")  # five readings lost by a sensor
    return (x, y), test


def with_inf_in_test():
    train, (x, y) = load(n_train=1200)
    x[7, 3] = -float("inf")  # one overflowed reading, in the test part
    return train, (x, y)
'''

MODELS = '''
from torch import nn


class MLP(nn.Module):
    def __init__(self, features=8, classes=3, hidden=16, depth=1):
        super().__init__()
        layers, width = [], features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.layers = nn.Sequential(*layers, nn.Linear(width, classes))

    def forward(self, x):
        return self.layers(x)


def build(depth=1, hidden=16):
    if depth > 2:
        raise ValueError(f"depth {depth}: this package only builds up to 2 hidden layers")
    return MLP(hidden=hidden, depth=depth)


def balanced_accuracy(outputs, targets):
    hits = [(outputs.argmax(1)[targets == c] == c).float().mean()
            for c in targets.unique()]
    return float(sum(hits) / len(hits))
'''


def own_package(folder: Path) -> tuple[str, str]:
    """A user's package: a data function and a model class in modules of their own (named
    after the test, so each test imports its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in folder.parent.name)[-40:]
    data, models = f"my_data_{tag}", f"my_models_{tag}"
    (folder / f"{data}.py").write_text(DATA)
    (folder / f"{models}.py").write_text(MODELS)
    return data, models


def own_sweep(tmp_path: Path, **overrides) -> Path:
    """The sweep file of the issue, beside the package, with its stores in tmp_path."""
    folder = tmp_path / "my_project"
    data, models = own_package(folder)
    doc = {
        "name": "mine",
        "model": {"factory": f"{models}:build", "kwargs": {"depth": 2}},
        "data": {"factory": f"{data}:load", "kwargs": {"n_train": 1200}, "val_size": 300,
                 "split_seed": 0},
        "loss": "cross_entropy",
        "sampler": {"name": "random"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 4, "epochs": 3},
        "storage": str(tmp_path / "stores" / "optuna.journal"),
        "tracking_uri": f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}",
        "search_space": {
            "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
            "lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
            "model.hidden": {"type": "int", "low": 4, "high": 64, "log": True},
        },
    }
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) and \
            isinstance(value, dict) else value
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def import_from(folder: Path, module: str):
    spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_your_own_package_sweeps_exports_reproduces_and_loads_into_its_class(
        tmp_path, capsys):
    path = own_sweep(tmp_path)
    assert main(["sweep", str(path), "--no-progress"]) == 0
    opened = open_existing(path)
    trials = opened.study.trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    runs = opened.tracker.runs(opened.ref.experiment_id, "trial")
    assert len(runs) == 4  # one child run per trial, carrying the model's own parameter
    by_trial = {r.data.tags["optimsweep.trial_number"]: r for r in runs}
    for t in trials:
        params = by_trial[str(t.number)].data.params
        assert params["model.hidden"] == str(t.params["model.hidden"])
        assert params["model.depth"] == "2" and params["optimizer"] == t.params["optimizer"]
        code = by_trial[str(t.number)].data.tags["optimsweep.code.model"]
        assert code.startswith(f"{opened.spec.model} = sha256 ")  # no package, no git here

    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    best = opened.study.best_trial
    assert config["model.hidden"] == best.params["model.hidden"] and config["model.depth"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "optimsweep.code.data" in metrics["provenance"]["trained_with"]

    # Reproduced by a process of its own started elsewhere, which never imported the code:
    # the config alone finds it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exit_code, printed, err = finish(launch(["train", "--config", out / "config.yaml", "--device",
                                        "cpu"], elsewhere, {**os.environ, "PYTHONPATH": ""}))
    assert exit_code == 0, err
    assert f"Accuracy: {100 * metrics['final_epoch']['test_accuracy']:.1f}%" in printed

    models = import_from(path.parent, opened.spec.model.split(":")[0])
    model = models.MLP(hidden=config["model.hidden"], depth=2)
    model.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
    x, y = import_from(path.parent, opened.spec.task.split(":")[0]).load()[1]
    assert (model(x).argmax(1) == y).float().mean() > 0.5  # it learned the blobs


BAD = [
    # (what is wrong, sweep overrides, the key the line names, words it says)
    ("no such module", lambda d, m: {"data": {"factory": "not_there:load"}},
     "data.factory", "module 'not_there' not found"),
    ("no such function", lambda d, m: {"model": {"factory": f"{m}:missing"}},
     "model.factory", "has no attribute 'missing'"),
    ("not callable", lambda d, m: {"model": {"factory": f"{m}:nn"}},
     "model.factory", "module is not callable"),
    ("not an import string", lambda d, m: {"data": {"factory": "my_data.load"}},
     "data.factory", "not an import string"),
    ("unknown data argument", lambda d, m: {"data": {"kwargs": {"rows": 5}}},
     "data.kwargs", "takes no argument 'rows'"),
    ("unknown model argument", lambda d, m: {"model": {"factory": f"{m}:build",
                                                       "kwargs": {"width": 3}}},
     "model.kwargs", "takes no argument 'width'"),
    ("searched argument the model lacks", lambda d, m: {"search_space": {
        "lr": 0.01, "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}}},
     "search_space.model.dropout", "takes no argument 'dropout'"),
    ("no loss", lambda d, m: {"loss": None}, "loss", "required with data.factory"),
    ("unknown loss", lambda d, m: {"loss": "hinge"}, "loss", "cross_entropy, nll, "),
    ("data of the wrong shape", lambda d, m: {"data": {"factory": f"{d}:wrong_shape",
                                                       "kwargs": {}}},
     "data.factory", "should return ((x_train, y_train), (x_test, y_test))"),
    ("NaN in the inputs", lambda d, m: {"data": {"factory": f"{d}:with_nan", "kwargs": {}}},
     "data.factory", "non-finite values (NaN or infinity): 5 in the training inputs (x)"),
    ("-inf in the test inputs", lambda d, m: {"data": {"factory": f"{d}:with_inf_in_test",
                                                        "kwargs": {}}},
     "data.factory", "non-finite values (NaN or infinity): 1 in the test inputs (x)"),
    ("validation bigger than the data", lambda d, m: {"data": {"val_size": 1200}},
     "data.val_size", "must be in [1, 1199]"),
]


@pytest.mark.parametrize("overrides, key, words", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_user_code_is_one_line_naming_the_key_before_any_store_exists(
        tmp_path, capsys, overrides, key, words):
    path = own_sweep(tmp_path)
    doc = yaml.safe_load(path.read_text())
    data, models = doc["data"]["factory"].split(":")[0], doc["model"]["factory"].split(":")[0]
    for k, v in overrides(data, models).items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = {**doc[k], **v} if isinstance(doc.get(k), dict) else v
    path.write_text(yaml.safe_dump(doc))
    assert main(["sweep", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: {key}: ") and words in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "stores").exists()  # no study, no trial, no run


def test_the_readme_example_of_your_own_model_is_a_valid_sweep_file(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    own = readme.split("## Sweep your own model", 1)[1]
    (tmp_path / "sweep.yaml").write_text(own.split("```yaml\n", 1)[1].split("```", 1)[0])
    (tmp_path / "my_data.py").write_text(DATA)
    (tmp_path / "my_models.py").write_text(MODELS)
    spec = load_spec(tmp_path / "sweep.yaml")
    assert spec.base_config()["model.depth"] == 2 and "model.hidden" in spec.search_space
    assert (spec.task, spec.model, spec.loss) == ("my_data:load", "my_models:build",
                                                  "cross_entropy")


def test_an_error_in_user_code_fails_that_trial_with_its_traceback_and_the_sweep_goes_on(
        tmp_path):
    path = own_sweep(tmp_path, search_space={
        "model.depth": {"type": "categorical", "choices": [1, 3]}, "lr": 0.01},
        model={"kwargs": {}}, budget={"n_trials": 2, "epochs": 1},
        baseline=[{"model.depth": 3}, {"model.depth": 1}])
    assert main(["sweep", str(path), "--no-progress"]) == 0
    opened = open_existing(path)
    failed, done = opened.study.trials
    assert (failed.state.name, done.state.name) == ("FAIL", "COMPLETE")
    client = MlflowClient(opened.tracker.uri)
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "depth 3" in run.data.tags["optimsweep.error"]
    trace = Path(client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path)))
    assert f"{opened.spec.model.split(':')[0]}.py" in trace.read_text()  # the user's line
    assert 'raise ValueError(f"depth {depth}' in trace.read_text()


def test_streamed_and_in_memory_data_train_the_same(tmp_path):
    """Datasets over `in_memory_mb` stream through a DataLoader in the same batch order
    as the tensors cut on the device: the same run, to the last bit."""
    folder = tmp_path / "pkg"
    data, models = own_package(folder)
    base = {"task": f"{data}:load", "data.as_datasets": True, "model": f"{models}:MLP",
            "loss": "cross_entropy", "code_dir": str(folder), "optimizer": "adam",
            "lr": 0.01, "epochs": 2, "batch_size": 50, "val_size": 200, "device": "cpu"}
    whole = TrainConfig.from_dict(base)
    streamed = TrainConfig.from_dict({**base, "in_memory_mb": 0})
    in_memory, on_disk = load_data(whole), load_data(streamed)
    assert not in_memory.streaming and on_disk.streaming
    assert in_memory.sizes == on_disk.sizes == (1000, 200, 300)
    a, b = fit(whole, in_memory), fit(streamed, on_disk)
    assert [(s.train_loss, s.val_loss, s.val_accuracy) for s in a.history] == \
        [(s.train_loss, s.val_loss, s.val_accuracy) for s in b.history]
    assert a.test_accuracy == b.test_accuracy > 0.5


def test_a_metric_function_is_logged_and_chosen_on(tmp_path):
    folder = tmp_path / "pkg"
    data, models = own_package(folder)
    path = own_sweep(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["metric"] = f"{doc['model']['factory'].split(':')[0]}:balanced_accuracy"
    path.write_text(yaml.safe_dump(doc))
    spec = load_spec(path)
    assert (spec.metric, spec.direction) == ("val_balanced_accuracy", "maximize")
    config = TrainConfig.from_dict({**spec.base_config(), "device": "cpu", "epochs": 1})
    result = fit(config, load_data(config))
    assert 0 < result.final.value("val_balanced_accuracy") <= 1
    assert set(result.test_extra) == {"test_balanced_accuracy"}


def test_the_fingerprint_covers_factories_and_arguments_not_where_the_code_lives(tmp_path):
    spec = load_spec(own_sweep(tmp_path / "a"))
    moved = load_spec(own_sweep(tmp_path / "b"))  # the same files in another folder...
    assert spec.code_dir != moved.code_dir
    doc = yaml.safe_load(spec.path.read_text())
    same_names = yaml.safe_dump({**doc, **{k: yaml.safe_load(moved.path.read_text())[k]
                                           for k in ("storage", "tracking_uri")}})
    moved.path.write_text(same_names.replace(moved.model.split(":")[0],
                                             spec.model.split(":")[0]))
    (moved.path.parent / f"{spec.model.split(':')[0]}.py").write_text(MODELS)
    (moved.path.parent / f"{spec.task.split(':')[0]}.py").write_text(DATA)
    assert load_spec(moved.path).fingerprint() == spec.fingerprint()  # ...is the same study
    doc["model"]["kwargs"]["depth"] = 1
    spec.path.write_text(yaml.safe_dump(doc))
    assert load_spec(spec.path).fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_seed_loss_trains_and_accuracy_is_reported_for_classifiers_only(loss, tmp_path):
    from optimsweep.core.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 4, generator=g)
    classes = x[:, :3].argmax(1)
    y = {"cross_entropy": classes, "nll": classes,
         "bce_with_logits": (x[:, :3] > 0).float(),
         "kl_div": torch.softmax(x[:, :3], 1)}.get(loss, x[:, :3].sum(1, keepdim=True))
    module = f"heads_{loss}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from torch import nn

        def head(outputs, log_probabilities=False):
            layers = [nn.Linear(4, outputs)]
            return nn.Sequential(*layers, nn.LogSoftmax(1)) if log_probabilities \\
                else layers[0]
        """))
    data = Dataset(x[:160], y[:160], x[160:200], y[160:200], x[200:], y[200:])
    config = TrainConfig(task=f"{module}:no_data_needed", model=f"{module}:head",
                         model_kwargs={"outputs": 3 if y.dim() == 1 else y.shape[1],
                                       "log_probabilities": loss in ("nll", "kl_div")},
                         code_dir=str(tmp_path), loss=loss, optimizer="adam", lr=0.02,
                         epochs=4, batch_size=32, device="cpu")
    result = fit(config, data)
    classifier = LOSSES[loss][1] is not None
    assert (result.final.val_accuracy is not None) == classifier
    assert result.history[-1].val_loss < result.history[0].val_loss
    if classifier:
        assert result.test_accuracy > 0.6
