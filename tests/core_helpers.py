"""What the tests use of the training core that the package itself does not: the built-in
tasks' data with their default splits, and one training epoch of one model."""

from __future__ import annotations

import torch

from core_loops import load_fashion_mnist, train_epoch  # benchmarks/: the same loops
from optimsweep.core.data import Dataset, load_dataset

__all__ = ["load_fashion_mnist", "make_regression", "train_epoch"]


def make_regression(*, device: torch.device | str = "cpu", val_size: int = 100,
                    split_seed: int = 0, train_subset: int | None = None) -> Dataset:
    """The seed's line y = 0.7 x + 0.3: 800 training, 100 validation, 100 test points."""
    return load_dataset("regression", device=device, val_size=val_size,
                        split_seed=split_seed, train_subset=train_subset)
