"""Learning on the real FashionMNIST data: the seed tutorial's numbers, reproduced."""

from __future__ import annotations

import pytest

from optimsweep.core.train import TrainConfig, fit

pytestmark = pytest.mark.learning


def test_tutorial_config_reaches_tutorial_accuracy(fashion_tutorial):
    """SGD lr 1e-3, batch 64, 10 epochs: the tutorial reports 70-71% test accuracy."""
    result = fit(TrainConfig(optimizer="sgd", lr=1e-3, batch_size=64, epochs=10), fashion_tutorial)
    assert 0.68 <= result.test_accuracy <= 0.74
    assert result.history[-1].val_loss < result.history[0].val_loss


def test_adam_beats_the_tutorial_by_far_in_four_epochs(fashion_tutorial):
    result = fit(TrainConfig(optimizer="adam", lr=1e-3, batch_size=64, epochs=4), fashion_tutorial)
    assert result.test_accuracy >= 0.86


def test_a_small_subset_already_learns(fashion_small):
    """Two epochs of Adam on 5k images beat chance (10%) by far."""
    result = fit(TrainConfig(optimizer="adam", epochs=2, batch_size=64), fashion_small)
    assert result.history[-1].val_accuracy > 0.7
