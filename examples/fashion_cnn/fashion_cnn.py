"""The seeds' CNN adapted to 28x28 grey FashionMNIST images, with the tutorial's data code:
a user's own package, named by import string in sweep.yaml.

The data function returns a pair of torch Datasets, as the tutorial builds them; optimsweep
carves the validation split from the training one and, small as they are, turns them into
tensors on the device once.
"""

import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset


def load(root: str | None = None, n_train: int | None = None, n_test: int | None = None):
    """The tutorial's FashionMNIST Datasets (ToTensor), optionally only their first images.
    `optimsweep data` (run by `make sweep`) puts the files under data/."""
    from torchvision.datasets import FashionMNIST
    from torchvision.transforms import ToTensor

    root = root or os.environ.get("OPTIMSWEEP_DATA", "data")
    train = FashionMNIST(root, train=True, download=False, transform=ToTensor())
    test = FashionMNIST(root, train=False, download=False, transform=ToTensor())
    if n_train is not None:
        train = Subset(train, range(n_train))
    if n_test is not None:
        test = Subset(test, range(n_test))
    return train, test


class Net(nn.Module):
    """The seed's Net (two conv + pool blocks, three linear layers) for 1 x 28 x 28 inputs
    and 10 classes: 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5."""

    def __init__(self, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=32, kernel_size=(3, 3))
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(in_channels=32, out_channels=64, kernel_size=3)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 5 * 5, hidden)
        self.fc2 = nn.Linear(hidden, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
