"""The models the seeds use, under the seeds' own attribute names.

Keeping the tutorial's names (`flatten`, `linear_relu_stack`, `weights`, `bias`) means a
`state_dict` saved here loads into the tutorial's own classes unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from optimsweep.core.usercode import resolve

MODELS_BY_TASK = {"fashion_mnist": ("mlp", "cnn"), "regression": ("linear",)}
# Model factories like any user's: a sweep file's `model: mlp` is `optimsweep.core.models:...`.
MODELS = {"mlp": "optimsweep.core.models:NeuralNetwork", "cnn": "optimsweep.core.models:SmallCNN",
          "linear": "optimsweep.core.models:LinearRegressionModel"}


class NeuralNetwork(nn.Module):
    """The tutorial's MLP: 784 -> 512 -> 512 -> 10 with ReLU."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head: a stronger optional model for 28x28 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LinearRegressionModel(nn.Module):
    """The seed's linear regression: y = weights * x + bias, both starting random."""

    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, dtype=torch.float))
        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x + self.bias


def build_model(name: str, kwargs: dict | None = None, code_dir: str | None = None) -> nn.Module:
    """A fresh model from a built-in name or a factory's import string, called with
    `kwargs` (the sweep's fixed and sampled `model.NAME` values)."""
    model = resolve(MODELS.get(name, name), code_dir)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name} returned {type(model).__name__}, not a "
                        "torch.nn.Module")
    return model
