"""Datasets as whole tensors on the training device, with a fixed train/validation split.

Batches are later cut from these tensors with `randperm` slices (see train.py), so the data is
decoded and moved to the device exactly once per process.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

import optimsweep.numerics  # noqa: F401  (before any tensor work: see its docstring)

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
TASKS = ("fashion_mnist", "regression")
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "regression": 100}
# Examples the train/validation split is carved from (regression: 1000 points less 100 test).
TRAIN_POOL = {"fashion_mnist": 60_000, "regression": 900}


class DataUnavailable(RuntimeError):
    """The FashionMNIST files could not be found, installed or downloaded."""


@dataclass
class Dataset:
    """Train/validation/test tensors already on `device`; `num_classes` is 0 for regression."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    split_seed: int

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> Dataset:
        if torch.device(device) == self.device:
            return self
        moved = {k: getattr(self, k).to(device) for k in self._tensor_fields()}
        return Dataset(**moved, num_classes=self.num_classes, split_seed=self.split_seed)

    @staticmethod
    def _tensor_fields() -> tuple[str, ...]:
        return ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def default_data_root() -> Path:
    return Path(os.environ.get("OPTIMSWEEP_DATA", "data"))


def _raw_dir(root: Path) -> Path:
    # torchvision.datasets.FashionMNIST reads <root>/FashionMNIST/raw/<file>
    return Path(root) / "FashionMNIST" / "raw"


def fashion_mnist_ready(root: Path) -> bool:
    raw = _raw_dir(root)
    return all((raw / name).is_file() for name in FASHION_FILES)


def _copy_from_debian(root: Path) -> bool:
    if not all((DEBIAN_DIR / f"{name}.gz").is_file() for name in FASHION_FILES):
        return False
    raw = _raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        partial = raw / f"{name}.partial"
        with gzip.open(DEBIAN_DIR / f"{name}.gz", "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(raw / name)  # a killed copy never looks like a finished file
    return True


def _apt_install(log) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    log(f"installing Debian package {DEBIAN_PACKAGE} ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]):
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            return False
    return True


def _torchvision_download(root: Path, log) -> bool:
    from torchvision.datasets import FashionMNIST

    log("downloading FashionMNIST with torchvision ...")
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # any network failure means: try the next source
        log(f"download failed: {exc}")
        return False
    return fashion_mnist_ready(root)


def prepare_fashion_mnist(root: Path | None = None, log=print) -> Path:
    """Make the four FashionMNIST files available under `root`; return the raw folder.

    Sources, in order: files already there, Debian's dataset package (installed with apt-get
    when running as root), torchvision's download.
    """
    root = Path(root or default_data_root())
    if fashion_mnist_ready(root):
        return _raw_dir(root)
    if _copy_from_debian(root) or (_apt_install(log) and _copy_from_debian(root)):
        log(f"FashionMNIST copied from {DEBIAN_DIR} to {_raw_dir(root)}")
        return _raw_dir(root)
    if _torchvision_download(root, log):
        return _raw_dir(root)
    raise DataUnavailable(
        f"FashionMNIST not found in {_raw_dir(root)}. Either put the four files "
        f"({', '.join(FASHION_FILES)}) there, install the Debian package "
        f"'{DEBIAN_PACKAGE}' (apt-get install {DEBIAN_PACKAGE}, as root), or run on a machine "
        "that can reach torchvision's download mirrors."
    )


def _split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < val_size < n:
        raise ValueError(f"val_size: {val_size} must be between 1 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_fashion_mnist(
    *,
    device: torch.device | str = "cpu",
    val_size: int = 10_000,
    split_seed: int = 0,
    train_subset: int | None = None,
    root: Path | None = None,
) -> Dataset:
    """FashionMNIST scaled to [0, 1] like the tutorial's ToTensor, as N x 1 x 28 x 28 floats.

    The validation split is carved from the 60k training images with `split_seed`, so every
    trial of a study sees the same split; the 10k test images are only ever reported.
    `train_subset` keeps the first N images of the training split (for quick tests).
    """
    from torchvision.datasets import FashionMNIST

    root = Path(root or default_data_root())
    prepare_fashion_mnist(root)
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)

    def images(ds) -> torch.Tensor:
        return ds.data.unsqueeze(1).to(device=device, dtype=torch.float32).div_(255.0)

    x, y = images(train), train.targets.to(device)
    train_idx, val_idx = _split(len(y), val_size, split_seed)
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    return Dataset(
        train_x=x[train_idx],
        train_y=y[train_idx],
        val_x=x[val_idx],
        val_y=y[val_idx],
        test_x=images(test),
        test_y=test.targets.to(device),
        num_classes=10,
        split_seed=split_seed,
    )


def make_regression(
    *,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    n: int = 1000,
    val_size: int = 100,
    test_size: int = 100,
    split_seed: int = 0,
    weight: float = 0.7,
    bias: float = 0.3,
) -> Dataset:
    """The seed's straight line y = 0.7 x + 0.3 on x in [0, 1), split train/validation/test."""
    x = torch.linspace(0, 1, n + 1)[:-1].unsqueeze(1)
    y = weight * x + bias
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    test_idx = perm[:test_size]
    val_idx = perm[test_size : test_size + val_size]
    train_idx = perm[test_size + val_size :][:train_subset]
    return Dataset(
        train_x=x[train_idx].to(device),
        train_y=y[train_idx].to(device),
        val_x=x[val_idx].to(device),
        val_y=y[val_idx].to(device),
        test_x=x[test_idx].to(device),
        test_y=y[test_idx].to(device),
        num_classes=0,
        split_seed=split_seed,
    )


def load_task(
    task: str,
    *,
    device: torch.device | str = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    train_subset: int | None = None,
) -> Dataset:
    val_size = DEFAULT_VAL_SIZE.get(task) if val_size is None else val_size
    if task == "fashion_mnist":
        return load_fashion_mnist(
            device=device,
            val_size=val_size,
            split_seed=split_seed,
            train_subset=train_subset,
        )
    if task == "regression":
        return make_regression(device=device, val_size=val_size, split_seed=split_seed,
                               train_subset=train_subset)
    raise ValueError(f"task: {task!r} is not known; choose one of: {', '.join(TASKS)}")
