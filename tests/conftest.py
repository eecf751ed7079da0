"""Shared fixtures: small real data (loaded once), the regression task, temporary stores."""

from __future__ import annotations

import pytest

from optimsweep.data import load_fashion_mnist, make_regression


@pytest.fixture(scope="session")
def fashion_small():
    """5k real FashionMNIST training images with the standard validation and test sets."""
    return load_fashion_mnist(train_subset=5_000)


@pytest.fixture(scope="session")
def fashion_tutorial():
    """59k training images, as close to the tutorial's 60k as a 1k validation split allows."""
    return load_fashion_mnist(val_size=1_000)


@pytest.fixture
def line():
    """The seed's y = 0.7 x + 0.3 regression task."""
    return make_regression()
