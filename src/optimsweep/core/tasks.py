"""The built-in tasks, written the way users write theirs: data factories returning
`((x_train, y_train), (x_test, y_test))` tensors (data.py splits off the validation part).
Sweep files name them `task: fashion_mnist` or `task: regression`; a user's own is
`data: {factory: "my_data:load"}`."""

from __future__ import annotations

from pathlib import Path

import torch

from optimsweep.core.data import default_data_root, prepare_fashion_mnist


def fashion_mnist(root: Path | str | None = None):
    """FashionMNIST scaled to [0, 1] like the tutorial's ToTensor, as N x 1 x 28 x 28 floats,
    with long labels: 60k training images, 10k test images."""
    from torchvision.datasets import FashionMNIST  # here: importing torchvision takes seconds

    root = Path(root or default_data_root())
    prepare_fashion_mnist(root)

    def part(train: bool):
        ds = FashionMNIST(str(root), train=train, download=False)
        return ds.data.unsqueeze(1).to(torch.float32).div_(255.0), ds.targets

    return part(True), part(False)


def regression(n: int = 1000, test_size: int = 100, weight: float = 0.7, bias: float = 0.3):
    """The seed's straight line y = 0.7 x + 0.3 on x in [0, 1): `test_size` points drawn at
    random (always the same ones) for testing, the rest for training."""
    x = torch.linspace(0, 1, n + 1)[:-1].unsqueeze(1)
    y = weight * x + bias
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    test, train = perm[:test_size], perm[test_size:]
    return (x[train], y[train]), (x[test], y[test])
