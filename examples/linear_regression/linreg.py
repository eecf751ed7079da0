"""The seed's linear regression as a user's own package: a data function and a model class.

Nothing here imports optimsweep: the sweep file names these by import string.
"""

import torch
from torch import nn


def line(n: int = 1000, test_size: int = 100, weight: float = 0.7, bias: float = 0.3):
    """y = weight * x + bias on x in [0, 1): ((x_train, y_train), (x_test, y_test))."""
    x = torch.linspace(0, 1, n + 1)[:-1].unsqueeze(1)
    y = weight * x + bias
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42))
    test, train = perm[:test_size], perm[test_size:]
    return (x[train], y[train]), (x[test], y[test])


class LinearRegressionModel(nn.Module):
    """The seed's model: y = weights * x + bias, both starting random."""

    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, dtype=torch.float))
        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x + self.bias
