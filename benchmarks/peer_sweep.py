"""The sweep a user writes by hand, for bench_time_to_quality.py to time against optimsweep.

The PyTorch tutorial "Optimizing Model Parameters": its `NeuralNetwork` (784-512-512-10 MLP
with ReLU), its `train_loop` and `test_loop` over `torch.utils.data.DataLoader`s and its
CrossEntropyLoss, driven by Optuna the way Optuna's documentation shows it:
`study.optimize(objective, n_trials=..., timeout=...)` with `TPESampler(seed=...,
n_startup_trials=8)`, a `MedianPruner(n_startup_trials=5, n_warmup_steps=3)` asked through
`trial.report` / `trial.should_prune` after every epoch, and `optuna_integration`'s
`MLflowCallback` recording each trial into a SQLite MLflow store (optuna-integration 5.0.0,
pinned in constraints.txt: the callback is deprecated there since 4.9 and due to go in 6.0,
but still what Optuna's and MLflow's pages show users).

What it shares with `sweeps/fashion_mnist.yaml`, so that only the tooling differs: the search
space (written out here as a user would, with the conditional parameters suggested only where
they apply), the tutorial's configuration run first as trial 0 (`study.enqueue_trial`, as the
file's `baseline:`), the split (validation images carved from the 60k training images with
`torch.randperm` under `split_seed`, the same images optimsweep validates on; the 10k test
images only reported), the training seed of every trial (`--seed`, also the sampler's), the
objective (the last epoch's validation accuracy) and 1-based epoch steps for the pruner.
Two departures from the tutorial's text: the training DataLoader shuffles (with a seeded
generator), as every real training loop does and optimsweep does, and the images come from
the raw files already on disk into a `TensorDataset` (torchvision's reader, no ToTensor per
image), so that data loading is not what is timed.

Usage: python benchmarks/peer_sweep.py --seed 0 --tracking-uri sqlite:///DIR/mlflow.db
       --trials-out DIR/trials.json [--n-trials 30] [--epochs 15] [--timeout 720]
       [--train-subset N] [--val-size 10000] [--data data]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
BASELINE = {"optimizer": "sgd", "lr": 1e-3, "batch_size": 64, "weight_decay": 1e-6,
            "scheduler": "none"}  # the tutorial's own settings


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def train_loop(dataloader, model, loss_fn, optimizer):
    model.train()
    for X, y in dataloader:
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_loop(dataloader, model, loss_fn):
    """(mean loss, accuracy in [0, 1]), as the tutorial computes them."""
    model.eval()
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    test_loss, correct = 0, 0
    with torch.no_grad():
        for X, y in dataloader:
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    return test_loss / num_batches, correct / size


def load_data(root: Path, val_size: int, split_seed: int, train_subset: int | None):
    """(train, validation, test) TensorDatasets of [0, 1] images and their labels."""
    from torchvision.datasets import FashionMNIST

    def images(train: bool):
        ds = FashionMNIST(str(root), train=train, download=False)
        return ds.data.unsqueeze(1).float() / 255, ds.targets

    x, y = images(True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:][:train_subset]
    return (TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]),
            TensorDataset(*images(False)))


def suggest(trial: optuna.Trial) -> dict:
    """The search space of sweeps/fashion_mnist.yaml."""
    p = {"optimizer": trial.suggest_categorical("optimizer", ["sgd", "momentum", "adam"]),
         "lr": trial.suggest_float("lr", 1e-4, 3e-1, log=True)}
    if p["optimizer"] == "momentum":
        p["momentum"] = trial.suggest_float("momentum", 0.8, 0.99)
    if p["optimizer"] == "adam":
        p["beta1"] = trial.suggest_float("beta1", 0.8, 0.95)
    p["batch_size"] = trial.suggest_categorical("batch_size", [64, 128, 256])
    p["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
    p["scheduler"] = trial.suggest_categorical("scheduler", ["none", "step", "plateau",
                                                             "cosine"])
    if p["scheduler"] == "step":
        p["step_size"] = trial.suggest_int("step_size", 3, 8)
        p["gamma"] = trial.suggest_float("gamma", 0.1, 0.5)
    if p["scheduler"] == "plateau":
        p["factor"] = trial.suggest_float("factor", 0.1, 0.5)
        p["patience"] = trial.suggest_int("patience", 1, 3)
    return p


def make_optimizer(p: dict, params):
    if p["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=p["lr"], betas=(p["beta1"], 0.999),
                                weight_decay=p["weight_decay"])
    return torch.optim.SGD(params, lr=p["lr"], momentum=p.get("momentum", 0.0),
                           weight_decay=p["weight_decay"])


def make_scheduler(p: dict, optimizer, epochs: int):
    if p["scheduler"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, p["step_size"], p["gamma"])
    if p["scheduler"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=p["factor"],
                                                          patience=p["patience"])
    if p["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def make_objective(data, epochs: int, seed: int):
    train_data, val_data, test_data = data

    def objective(trial: optuna.Trial) -> float:
        p = suggest(trial)
        torch.manual_seed(seed)
        model = NeuralNetwork()
        train_dataloader = DataLoader(train_data, batch_size=p["batch_size"], shuffle=True,
                                      generator=torch.Generator().manual_seed(seed))
        val_dataloader = DataLoader(val_data, batch_size=p["batch_size"])
        loss_fn = nn.CrossEntropyLoss()
        optimizer = make_optimizer(p, model.parameters())
        scheduler = make_scheduler(p, optimizer, epochs)
        for t in range(1, epochs + 1):
            train_loop(train_dataloader, model, loss_fn, optimizer)
            val_loss, val_accuracy = test_loop(val_dataloader, model, loss_fn)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_loss)
            elif scheduler is not None:
                scheduler.step()
            trial.report(val_accuracy, t)
            if trial.should_prune():
                raise optuna.TrialPruned()
        test_dataloader = DataLoader(test_data, batch_size=p["batch_size"])
        trial.set_user_attr("test_accuracy", test_loop(test_dataloader, model, loss_fn)[1])
        return val_accuracy

    return objective


def trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    """What the benchmark reads of a finished trial, optimsweep's or this script's."""
    began, done = trial.datetime_start, trial.datetime_complete
    return {"number": trial.number, "state": trial.state.name, "value": trial.value,
            "test_accuracy": trial.user_attrs.get("test_accuracy"),
            "start": began.timestamp() if began else None,
            "complete": done.timestamp() if done else None,
            "epochs": len(trial.intermediate_values), "params": trial.params,
            "interrupted": bool(trial.user_attrs.get("interrupted")),
            "error": trial.user_attrs.get("error")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed")
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=720, help="seconds; 0: none")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=10_000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--study-name", default="fashion_mnist_peer")
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///DIR/mlflow.db")
    parser.add_argument("--trials-out", type=Path, required=True, help="JSON of the trials")
    args = parser.parse_args()

    # Imported here: the benchmark imports trial_record from this file without MLflow.
    from optuna_integration import MLflowCallback

    data = load_data(args.data, args.val_size, args.split_seed, args.train_subset)
    with warnings.catch_warnings():  # experimental, and deprecated since 4.9 (see above)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        mlflc = MLflowCallback(tracking_uri=args.tracking_uri, metric_name="val_accuracy")
    study = optuna.create_study(
        study_name=args.study_name, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=8),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3))
    study.enqueue_trial(BASELINE)
    study.optimize(make_objective(data, args.epochs, args.seed), n_trials=args.n_trials,
                   timeout=args.timeout or None, callbacks=[mlflc])
    args.trials_out.write_text(json.dumps([trial_record(t) for t in study.trials]))


if __name__ == "__main__":
    main()
