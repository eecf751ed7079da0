"""Helpers that write small sweep files whose stores live in a test's temporary folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from optimsweep.sweep.check import load_spec


def line_sweep(tmp_path: Path, name: str = "line", **overrides) -> Path:
    """The seed's regression task: trials take a fraction of a second."""
    doc = {
        "name": name,
        "task": "regression",
        "model": "linear",
        "metric": "val_loss",
        "seed": 0,
        "sampler": {"name": "random"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 4, "epochs": 3},
        "storage": str(tmp_path / "mlruns" / "optuna.journal"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "search_space": {
            "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
            "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
            "momentum": {"type": "float", "low": 0.5, "high": 0.95},
            "batch_size": {"type": "categorical", "choices": [16, 64]},
        },
    }
    doc.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fashion_sweep(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    """Real FashionMNIST, but only 1k training and 1k validation images."""
    doc = {
        "sampler": {"name": "random"},
        "pruner": {"name": "none"},
        "budget": {"n_trials": 3, "epochs": 2},
        "data": {"train_subset": 1000, "val_size": 1000},
        "search_space": {
            "optimizer": {"type": "categorical", "choices": ["adam"]},
            "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
        },
    }
    doc.update(overrides)
    return line_sweep(tmp_path, name, **{"task": "fashion_mnist", "model": "mlp",
                                         "metric": "val_accuracy", **doc})


def load(path: Path):
    return load_spec(path)
