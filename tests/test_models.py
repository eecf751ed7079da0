"""The models keep the seeds' layer names, so their weights load into the seeds' classes."""

from __future__ import annotations

import torch
from torch import nn

from optimsweep.core.artifacts import load_state_dict, save_state_dict
from optimsweep.core.models import build_model


class TutorialNeuralNetwork(nn.Module):
    """Copied from the seed tutorial ("Optimizing Model Parameters"), unchanged."""

    def __init__(self):
        super(TutorialNeuralNetwork, self).__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10)
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


class SeedLinearRegressionModel(nn.Module):
    """The seed's linear regression model."""

    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, requires_grad=True, dtype=torch.float))
        self.bias = nn.Parameter(torch.randn(1, requires_grad=True, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights * x + self.bias


def test_mlp_state_dict_loads_into_the_tutorial_class(tmp_path):
    model = build_model("mlp")
    path = save_state_dict(model, tmp_path / "model.pt")
    tutorial = TutorialNeuralNetwork()
    tutorial.load_state_dict(torch.load(path, weights_only=True))  # strict by default
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(tutorial(x), model(x))


def test_linear_state_dict_loads_into_the_seed_class(tmp_path):
    model = build_model("linear")
    seed = SeedLinearRegressionModel()
    seed.load_state_dict(load_state_dict(save_state_dict(model, tmp_path / "line.pt")))
    assert torch.equal(seed.weights, model.weights) and torch.equal(seed.bias, model.bias)


def test_cnn_maps_images_to_ten_logits():
    assert build_model("cnn")(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_save_leaves_no_partial_file(tmp_path):
    save_state_dict(build_model("mlp"), tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
