"""The data a config trains on: whatever its data factory returns, split into train,
validation (carved from the training part with `split_seed`) and test, once per process.

A factory (built-in, see tasks.py, or the user's own by import string) returns
`((x_train, y_train), (x_test, y_test))` as tensors, or a pair of `torch.utils.data.Dataset`s.
Data up to `in_memory_mb` becomes whole tensors on the training device, cut into batches with
`randperm` slices (see train.py); larger datasets stream through a `DataLoader` in the same
batch order, so both paths train the same way.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

import optimsweep.core.numerics  # noqa: F401  (before any tensor work: see its docstring)
from optimsweep.core.usercode import resolve
from optimsweep.errors import DataError, DataUnavailable, UserCodeError

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# The built-in tasks: data factories like any user's (tasks.py).
TASKS = {"fashion_mnist": "optimsweep.core.tasks:fashion_mnist",
         "regression": "optimsweep.core.tasks:regression"}
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "regression": 100}
# Examples the train/validation split is carved from (regression: 1000 points less 100 test).
TRAIN_POOL = {"fashion_mnist": 60_000, "regression": 900}
VAL_FRACTION = 0.1  # of a user's training examples, when the sweep file gives no val_size
# Datasets up to this size become tensors on the device; larger ones stream (a sweep file's
# data.in_memory_mb). 1 GiB holds FashionMNIST five times over and fits any GPU.
IN_MEMORY_MB = 1024
EVAL_BATCH = 4096


@dataclass
class Dataset:
    """Train/validation/test tensors already on `device`; `num_classes` is 0 for regression."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 0
    split_seed: int = 0
    # what load_dataset made it from: {"task", "factory", "kwargs"} (empty when built by hand)
    origin: dict = field(default_factory=dict, compare=False)
    _digests: dict | None = field(default=None, init=False, repr=False, compare=False)
    streaming = False

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train_y), len(self.val_y), len(self.test_y)

    def to(self, device: torch.device | str) -> Dataset:
        if torch.device(device) == self.device:
            return self
        moved = {k: getattr(self, k).to(device) for k in self._tensor_fields()}
        data = Dataset(**moved, num_classes=self.num_classes, split_seed=self.split_seed,
                       origin=self.origin)
        data._digests = self._digests  # the same bytes
        return data

    def train_batches(self, orders: torch.Tensor, batch_size: int) -> Iterator[tuple]:
        """(K, n) batch orders -> (x, y) batches of shape (K, batch, ...): member k's
        batch i is rows orders[k, i*batch_size : (i+1)*batch_size]."""
        orders = orders.to(self.device)
        for start in range(0, orders.shape[1], batch_size):
            idx = orders[:, start : start + batch_size]
            yield self.train_x[idx], self.train_y[idx]

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[tuple]:
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

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
    from torchvision.datasets import FashionMNIST  # here: importing torchvision takes seconds

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


@dataclass
class StreamingData:
    """Data too large for memory: train/validation subsets of the factory's training
    Dataset and its test Dataset, read through DataLoaders batch by batch."""

    train: TorchDataset
    val: TorchDataset
    test: TorchDataset
    device: torch.device
    split_seed: int = 0
    num_classes: int = 0
    origin: dict = field(default_factory=dict, compare=False)  # as Dataset's
    _digests: dict | None = field(default=None, init=False, repr=False, compare=False)
    streaming = True

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)

    def to(self, device: torch.device | str) -> StreamingData:
        data = dataclasses.replace(self, device=torch.device(device))
        data._digests = self._digests
        return data

    def _loader(self, dataset: TorchDataset, batch_size: int, order=None) -> Iterator[tuple]:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order,
                            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def train_batches(self, orders: torch.Tensor, batch_size: int) -> Iterator[tuple]:
        """A group of one (streamed data is never fused): the same batches, in the same
        order, as the in-memory path cuts from its tensors."""
        if orders.shape[0] != 1:
            raise ValueError("streamed data trains one member at a time")
        for x, y in self._loader(self.train, batch_size, orders[0].tolist()):
            yield x.unsqueeze(0), y.unsqueeze(0)

    def eval_batches(self, split: str, batch_size: int = EVAL_BATCH) -> Iterator[tuple]:
        return self._loader(getattr(self, split), batch_size)


SPLITS = ("train", "val", "test")


def split_digests(data: Dataset | StreamingData) -> dict[str, str]:
    """A sha256 of each split ("train", "val", "test"), computed once per data object (a
    process loads its data once, so once per process). In memory: of the split's tensors'
    dtypes, shapes and bytes (0.2 s for FashionMNIST's 200 MB on one CPU core). Streamed:
    reading the data again would cost an epoch, so it is a hash of what selects the examples
    instead: the factory, its kwargs, the split seed and the split's indices; it changes when
    any of them does, not when the factory's files change under the same arguments."""
    if data._digests is None:
        data._digests = {split: _stream_digest(data, split) if data.streaming
                         else _tensor_digest(getattr(data, f"{split}_x"),
                                             getattr(data, f"{split}_y"))
                         for split in SPLITS}
    return data._digests


def _tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        digest.update(f"{t.dtype} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _stream_digest(data: StreamingData, split: str) -> str:
    part = getattr(data, split)
    indices = part.indices if isinstance(part, Subset) else range(len(part))
    seed = {} if split == "test" else {"split_seed": data.split_seed}  # the test part is whole
    digest = hashlib.sha256(json.dumps({**data.origin, **seed, "split": split},
                                       sort_keys=True, default=str).encode())
    digest.update(torch.as_tensor(list(indices), dtype=torch.int64).numpy())
    return digest.hexdigest()


def _split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < val_size < n:
        raise ValueError(f"val_size: {val_size} must be between 1 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def _is_dataset(part) -> bool:
    return hasattr(part, "__getitem__") and hasattr(part, "__len__") and not isinstance(
        part, tuple | list | torch.Tensor)


def _checked(ref: str, returned) -> tuple:
    """The factory's ((x, y), (x, y)) tensors or (Dataset, Dataset), checked; one clear
    line about the first thing wrong."""
    expected = ("should return ((x_train, y_train), (x_test, y_test)) as tensors, or a pair "
                "of torch.utils.data.Dataset (train, test)")
    if not isinstance(returned, tuple | list) or len(returned) != 2:
        raise DataError(f"{ref} {expected}; it returned {_shape_of(returned)}")
    if all(_is_dataset(part) for part in returned):
        for name, part in zip(("train", "test"), returned, strict=True):
            if len(part) == 0:
                raise DataError(f"{ref}: its {name} Dataset is empty")
            item = part[0]
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise DataError(f"{ref}: its {name} Dataset's items should be (x, y) pairs; "
                                f"item 0 is {_shape_of(item)}")
        return tuple(returned)
    for name, part in zip(("train", "test"), returned, strict=True):
        if (not isinstance(part, tuple | list) or len(part) != 2
                or not all(isinstance(t, torch.Tensor) for t in part)):
            raise DataError(f"{ref} {expected}; its {name} part is {_shape_of(part)}")
        x, y = part
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
            raise DataError(f"{ref}: {name} x and y should be tensors with one row per "
                            f"example; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    (x, y), (tx, ty) = returned
    if x.shape[1:] != tx.shape[1:] or y.shape[1:] != ty.shape[1:]:
        raise DataError(f"{ref}: train and test examples differ in shape: x {tuple(x.shape)} "
                        f"and {tuple(tx.shape)}, y {tuple(y.shape)} and {tuple(ty.shape)}")
    return tuple(returned)


def _check_finite(where: str, parts: dict[str, torch.Tensor]) -> None:
    """NaN or infinite values in the data make every trial diverge, whatever its config:
    say where they are before any study exists, not as a training failure of each trial."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in parts.items()
           if (t.is_floating_point() or t.is_complex()) and not _surely_finite(t)}
    found = [f"{n} in the {name}" for name, n in bad.items() if n]
    if found:
        raise DataError(f"{where}: the data holds non-finite values (NaN or infinity): "
                        f"{', '.join(found)}; every trial would diverge on them, so remove or "
                        "impute them in the data factory")


def _surely_finite(t: torch.Tensor) -> bool:
    """A NaN makes the extremes NaN and an infinity is one of them, so finite extremes mean
    finite data: one reduction, no mask (FashionMNIST: 15 ms against 530 ms for counting)."""
    if t.numel() == 0:
        return True
    if t.is_complex():  # no order to take extremes in: counted instead
        return False
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _shape_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}: (" + ", ".join(
            _shape_of(v) for v in value[:3]) + (", ...)" if len(value) > 3 else ")")
    return f"a {type(value).__name__}"


def _bytes(item) -> int:
    return sum(torch.as_tensor(v).numel() * torch.as_tensor(v).element_size() for v in item)


def _tensors(dataset: TorchDataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=1024):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _classes(y: torch.Tensor) -> int:
    return int(y.max()) + 1 if y.dtype == torch.long and y.dim() == 1 else 0


def load_dataset(
    task: str = "fashion_mnist",
    kwargs: dict | None = None,
    *,
    code_dir: str | None = None,
    device: torch.device | str = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    train_subset: int | None = None,
    in_memory_mb: float = IN_MEMORY_MB,
) -> Dataset | StreamingData:
    """Call the data factory `task` (a built-in task or an import string) with `kwargs`,
    carve the validation split from its training part with `split_seed` (so every trial of a
    study validates on the same examples), keep the first `train_subset` training examples,
    and put it on `device`, whole or streamed. The test part is only ever reported."""
    ref = TASKS.get(task, task)
    where = f"data.factory: {ref}" if task not in TASKS else f"task: {task}"
    try:
        factory = resolve(ref, code_dir)
        returned = factory(**(kwargs or {}))
    except (UserCodeError, DataUnavailable):
        raise
    except Exception as exc:
        raise DataError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    train, test = _checked(where, returned)
    n = len(train) if _is_dataset(train) else len(train[1])
    val_size = DEFAULT_VAL_SIZE.get(task, max(1, int(n * VAL_FRACTION))) \
        if val_size is None else val_size
    if not 1 <= val_size < n:
        raise DataError(f"data.val_size: {val_size} must be in [1, {n - 1}]: {ref} "
                        f"returned {n} training examples and one must be left to train on")
    train_idx, val_idx = _split(n, val_size, split_seed)
    origin = {"task": task, "factory": ref, "kwargs": dict(kwargs or {})}
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    device = torch.device(device)
    if _is_dataset(train):
        try:
            size = _bytes(train[0]) * (len(train) + len(test))
            if size > in_memory_mb * 2**20:
                return StreamingData(Subset(train, train_idx.tolist()),
                                     Subset(train, val_idx.tolist()), test, device, split_seed,
                                     origin=origin)
            train, test = _tensors(train), _tensors(test)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{where}: its Datasets' (x, y) items should be tensors or "
                            f"numbers (add a transform such as ToTensor): {exc}") from exc
    (x, y), (test_x, test_y) = train, test
    _check_finite(where, {"training inputs (x)": x, "training targets (y)": y,
                          "test inputs (x)": test_x, "test targets (y)": test_y})
    return Dataset(train_x=x[train_idx].to(device), train_y=y[train_idx].to(device),
                   val_x=x[val_idx].to(device), val_y=y[val_idx].to(device),
                   test_x=test_x.to(device), test_y=test_y.to(device),
                   num_classes=_classes(y), split_seed=split_seed, origin=origin)

