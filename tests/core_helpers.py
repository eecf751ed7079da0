"""What the tests use of the training core that the package itself does not: the built-in
tasks' data with their default splits, and one training epoch of one model."""

from __future__ import annotations

import torch

from optimsweep.core.data import Dataset, load_dataset
from optimsweep.core.stack import ModelStack
from optimsweep.core.train import _diverged, _train_epoch


def load_fashion_mnist(*, device: torch.device | str = "cpu", val_size: int = 10_000,
                       split_seed: int = 0, train_subset: int | None = None) -> Dataset:
    """The tutorial's data: 60k training images (less the validation split), 10k test."""
    return load_dataset("fashion_mnist", device=device, val_size=val_size,
                        split_seed=split_seed, train_subset=train_subset)


def make_regression(*, device: torch.device | str = "cpu", val_size: int = 100,
                    split_seed: int = 0, train_subset: int | None = None) -> Dataset:
    """The seed's line y = 0.7 x + 0.3: 800 training, 100 validation, 100 test points."""
    return load_dataset("regression", device=device, val_size=val_size,
                        split_seed=split_seed, train_subset=train_subset)


def train_epoch(model, loss_fn, optimizer, x, y, batch_size: int, generator, epoch: int,
                precision: str = "fp32") -> float:
    """One epoch of one model on tensors (x, y), as `fit` trains it; returns the mean batch
    loss. Raises DivergedError at the first non-finite loss."""
    data = Dataset(x, y, x[:0], y[:0], x[:0], y[:0])
    losses = _train_epoch(ModelStack([model]), [optimizer], [generator], loss_fn, data,
                          batch_size, precision)[:, 0]
    problem = _diverged(losses, epoch)
    if problem is not None:
        raise problem
    return float(losses.mean())
