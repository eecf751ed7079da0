"""What the benchmarks use of the training core that the package itself does not: the
tutorial's data with its default split, and `fit`'s epoch for one model (train, evaluate)."""

from __future__ import annotations

import torch
from torch import nn

from optimsweep.core.data import Dataset, load_dataset
from optimsweep.core.stack import ModelStack
from optimsweep.core.train import _diverged, _evaluate, _Scoring, _train_part


def load_fashion_mnist(*, device: torch.device | str = "cpu", val_size: int = 10_000,
                       split_seed: int = 0, train_subset: int | None = None) -> Dataset:
    """The tutorial's data: 60k training images (less the validation split), 10k test."""
    return load_dataset("fashion_mnist", device=device, val_size=val_size,
                        split_seed=split_seed, train_subset=train_subset)


def train_epoch(model, loss_fn, optimizer, x, y, batch_size: int, generator, epoch: int,
                precision: str = "fp32") -> float:
    """One epoch of one model on tensors (x, y), as `fit` trains it; returns the mean batch
    loss. Raises DivergedError at the first non-finite loss."""
    data = Dataset(x, y, x[:0], y[:0], x[:0], y[:0])
    order = torch.randperm(x.shape[0], generator=generator).unsqueeze(0)
    losses = _train_part(ModelStack([model]), [optimizer], order, loss_fn, data, batch_size,
                         precision)[:, 0]
    problem = _diverged(losses, epoch)
    if problem is not None:
        raise problem
    return float(losses.mean())


def evaluate(model: nn.Module, loss_fn, x, y, precision: str = "fp32") -> tuple[float,
                                                                                float | None]:
    """Mean loss and, for class labels (long y), accuracy in [0, 1] of one model on (x, y)."""
    scoring = _Scoring(loss_fn, "classes" if y.dtype == torch.long else None)
    data = Dataset(x[:0], y[:0], x[:0], y[:0], x, y)
    return _evaluate(ModelStack([model]), scoring, data, "test", precision)[0][:2]
