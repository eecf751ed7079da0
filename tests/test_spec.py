"""Sweep files: what is accepted, and a clear error for everything else."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from optimsweep.cli import main
from optimsweep.sweep.check import load_spec, parse_spec
from optimsweep.sweep.space import suggest_config
from optimsweep.sweep.spec import SpecError
from sweeps import line_sweep

SHIPPED = sorted(Path(__file__).parent.parent.joinpath("sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweep_files_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem and spec.search_space and spec.budget.n_trials > 0


def test_defaults_fill_in_what_a_file_leaves_out():
    spec = parse_spec("search_space: {lr: {type: float, low: 1.0e-4, high: 0.1, log: true}}",
                      "sweeps/mini.yaml")
    assert (spec.name, spec.task, spec.model, spec.metric, spec.direction) == (
        "mini", "fashion_mnist", "mlp", "val_accuracy", "maximize")
    assert spec.sampler["name"] == "tpe" and spec.pruner["name"] == "median"


def test_exponents_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 as a string; the sweep file means a number."""
    spec = parse_spec("search_space: {lr: {type: float, low: 1e-4, high: 1e-1, log: true}}")
    assert spec.search_space["lr"].distribution.low == pytest.approx(1e-4)


def test_a_plain_value_fixes_a_parameter():
    spec = parse_spec("search_space: {lr: 0.01, optimizer: {type: categorical, "
                      "choices: [sgd, adam]}}")
    assert spec.fixed["lr"] == 0.01 and "lr" not in spec.search_space


def _sampled(spec, **params):
    return suggest_config(optuna.trial.FixedTrial(params), spec.search_space,
                          spec.base_config()).active_params()


def test_conditional_params_are_sampled_only_when_they_apply():
    spec = parse_spec(yaml.safe_dump({"search_space": {
        "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99},
        "beta1": {"type": "float", "low": 0.8, "high": 0.95},
        "scheduler": {"type": "categorical", "choices": ["none", "step"]},
        "step_size": {"type": "int", "low": 1, "high": 5},
    }}))
    trial = optuna.trial.FixedTrial({"optimizer": "sgd", "scheduler": "none"})
    config = suggest_config(trial, spec.search_space, spec.base_config())
    assert config.optimizer == "sgd" and set(trial.params) == {"optimizer", "scheduler"}
    trial = optuna.trial.FixedTrial({"optimizer": "momentum", "momentum": 0.7,
                                     "scheduler": "step", "step_size": 3})
    suggest_config(trial, spec.search_space, spec.base_config())
    assert set(trial.params) == {"optimizer", "momentum", "scheduler", "step_size"}


def test_explicit_when_narrows_a_parameter_further():
    spec = parse_spec(yaml.safe_dump({"search_space": {
        "batch_size": {"type": "categorical", "choices": [64, 256]},
        "lr": {"type": "float", "low": 0.01, "high": 0.1, "when": {"batch_size": 256}},
    }}))
    trial = optuna.trial.FixedTrial({"batch_size": 64})
    config = suggest_config(trial, spec.search_space, spec.base_config())
    assert config.lr == 1e-3 and "lr" not in trial.params


BAD = {
    "heartbeat no longer than its grace period": (
        {"heartbeat": {"interval": 10, "grace_period": 10}},
        "heartbeat.grace_period: 10 must be longer than the interval (10 s)"),
    "unknown heartbeat key": ({"heartbeat": {"every": 5}},
                              "heartbeat.every: unknown key; allowed: interval, grace_period"),
    "fractional heartbeat": ({"heartbeat": {"interval": 0.5}},
                             "heartbeat.interval: 0.5 is not an integer"),
    "store_timeout of zero": ({"store_timeout": 0}, "store_timeout: 0.0 must be > 0"),
    "fuse of zero": ({"fuse": 0}, "fuse: 0 is not allowed; choose auto or an integer in [1, 64]"),
    "fuse by name": ({"fuse": "max"}, "fuse: 'max' is not allowed; choose auto or an integer"),
    "unknown precision": ({"fixed": {"precision": "fp16"}},
                          "fixed.precision: precision: 'fp16' is not allowed; choose one of: "
                          "fp32, bf16, auto"),
    "storage of an unsupported database": (
        {"storage": "mysql://root:hunter2@db/optuna"},
        "storage: mysql://root:***@db/optuna is not allowed; give a journal file path"),
    "tracking in a plain folder": ({"tracking_uri": "mlruns"},
                                   "tracking_uri: mlruns is not allowed (MLflow 3 has no plain"),
    "unknown top-level key": ({"trails": 3}, "trails: unknown key; allowed: name,"),
    "unknown parameter": ({"search_space": {"learning_rate": 0.1}},
                          "search_space.learning_rate: unknown key; allowed:"),
    "unknown type": ({"search_space": {"lr": {"type": "uniform", "low": 0.1, "high": 1}}},
                     "search_space.lr.type: 'uniform' is not allowed; choose one of: float, int"),
    "wrong type": ({"search_space": {"lr": {"type": "float", "low": "small", "high": 1}}},
                   "search_space.lr.low: 'small' is not a number"),
    "empty range": ({"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}},
                    "search_space.lr: empty or inverted range"),
    "inverted range": ({"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}},
                       "search_space.lr: empty or inverted range"),
    "non-positive lr": ({"search_space": {"lr": {"type": "float", "low": 0, "high": 0.1}}},
                        "search_space.lr.low: lr: 0.0 is out of range; must be a number > 0"),
    "unknown optimizer": ({"search_space": {"optimizer": {"type": "categorical",
                                                          "choices": ["sgd", "lbfgs"]}}},
                          "optimizer: 'lbfgs' is not allowed; choose one of: sgd, momentum, "
                          "adam, adamw, rmsprop"),
    "empty choices": ({"search_space": {"optimizer": {"type": "categorical", "choices": []}}},
                      "search_space.optimizer.choices: expected a non-empty list"),
    "batch size below 1": ({"search_space": {"batch_size": {"type": "int", "low": 0,
                                                            "high": 64}}},
                           "batch_size: 0 is out of range; must be an integer >= 1"),
    "unknown sampler": ({"sampler": {"name": "bayes"}},
                        "sampler.name: 'bayes' is not allowed; choose one of: tpe, random, grid"),
    "unknown sampler option": ({"sampler": {"name": "tpe", "n_startup": 3}},
                               "sampler.n_startup: not an option of tpe; allowed:"),
    "unknown pruner": ({"pruner": "early"},
                       "pruner.name: 'early' is not allowed; choose one of: median"),
    "zero trials": ({"budget": {"n_trials": 0, "epochs": 2}}, "budget.n_trials: 0 must be > 0"),
    "unknown budget key": ({"budget": {"trials": 3}}, "budget.trials: unknown key; allowed:"),
    "unknown metric": ({"metric": "f1"}, "metric: 'f1' is not allowed; choose one of:"),
    "accuracy for regression": ({"metric": "val_accuracy"},
                                "metric: val_accuracy needs a classification loss"),
    "grid over a continuous range": ({"sampler": "grid"},
                                     "sampler: grid needs every search_space entry"),
    "condition on an unknown parameter": (
        {"search_space": {"lr": {"type": "float", "low": 0.01, "high": 0.1,
                                 "when": {"scheduler": "step"}}}},
        "search_space.lr.when.scheduler: must name a categorical search_space parameter"),
    "parameter that never applies": (
        {"fixed": {"optimizer": "adam"},
         "search_space": {"momentum": {"type": "float", "low": 0.5, "high": 0.9}}},
        "search_space.momentum: never applies"),
    "baseline outside the space": ({"baseline": [{"lr": 5.0}]},
                                   "baseline[0].lr: 5.0 lies outside the search space"),
    "negative seed": ({"seed": -1},
                      "seed: seed: -1 is out of range; must be an integer in [0, 4294967295]"),
    "seed beyond numpy's range": ({"seed": "1e12"}, "seed: seed: 1000000000000 is out of range"),
    "validation split as large as the data": (
        {"data": {"val_size": 900}},
        "data.val_size: val_size: 900 is out of range; must be an integer in [1, 899]"),
    "validation split larger than FashionMNIST": (
        {"task": "fashion_mnist", "model": "mlp", "metric": "val_accuracy",
         "data": {"val_size": 70000}},
        "data.val_size: val_size: 70000 is out of range; must be an integer in [1, 59999]"),
    "sampler option of the wrong type": (
        {"sampler": {"name": "tpe", "n_startup_trials": "8"}},
        "sampler.n_startup_trials: '8' is not an integer"),
    "grid with a partial baseline": (
        {"sampler": "grid",
         "search_space": {"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                          "batch_size": {"type": "categorical", "choices": [16, 64]}},
         "baseline": [{"optimizer": "sgd"}]},
        "baseline[0]: the grid sampler needs every parameter of a baseline; missing: "
        "batch_size"),
    "infinite weight decay": ({"fixed": {"weight_decay": float("inf")}},
                              "fixed.weight_decay: weight_decay: inf is not a finite number"),
    "a name that climbs out of exports/": ({"name": "../../x"}, "name: '../../x' is not allowed"),
    "an absolute name": ({"name": "/tmp/x"}, "name: '/tmp/x' is not allowed"),
    "a quote in the name": ({"name": "it's"}, "name: \"it's\" is not allowed"),
}


@pytest.mark.parametrize("overrides, message", BAD.values(), ids=BAD.keys())
def test_invalid_file_names_the_key_and_creates_nothing(tmp_path, capsys, overrides, message):
    path = line_sweep(tmp_path, **overrides)
    with pytest.raises(SpecError, match=None) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "mlruns").exists()  # no study, no MLflow database, no runs


def test_a_binary_sweep_file_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(bytes(range(256)))
    assert main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: not a text file (UTF-8 YAML expected)\n"
    assert not (tmp_path / "mlruns").exists()


def test_a_parameter_listed_before_the_one_it_depends_on_is_still_sampled():
    """step_size depends on scheduler, which depends on optimizer: file order is free."""
    spec = parse_spec(yaml.safe_dump({"search_space": {
        "step_size": {"type": "int", "low": 1, "high": 5},
        "scheduler": {"type": "categorical", "choices": ["none", "step"],
                      "when": {"optimizer": ["adam"]}},
        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
    }}, sort_keys=False))
    params = {"optimizer": "adam", "scheduler": "step", "step_size": 2}
    trial = optuna.trial.FixedTrial(params)
    config = suggest_config(trial, spec.search_space, spec.base_config())
    assert config.step_size == 2 and trial.params == params


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="no such sweep file"):
        load_spec(tmp_path / "nope.yaml")


def test_the_docs_full_example_is_a_valid_sweep_file():
    """The documented full example stays in step with what the parser accepts."""
    page = Path(__file__).parent.parent.joinpath("docs", "guide", "sweep-file.md").read_text()
    full = page.split("## A full example", 1)[1]
    example = full.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(example, "docs/guide/sweep-file.md")
    assert spec.search_space["momentum"].when == {"optimizer": ("momentum",)}
    assert spec.search_space["weight_decay"].when == {"optimizer": ("sgd", "momentum")}
    assert spec.fixed["nesterov"] is False and len(spec.baseline) == 1
