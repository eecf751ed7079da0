"""Data: found offline, decoded once into tensors, split the same way every time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from core_helpers import load_fashion_mnist, make_regression
from optimsweep.core import data as data_module
from optimsweep.core.data import DataUnavailable, load_dataset, prepare_fashion_mnist, split_digests
from optimsweep.core.tasks import regression


def test_fashion_mnist_is_tensors_in_unit_range(fashion_small):
    d = fashion_small
    assert d.train_x.shape == (5_000, 1, 28, 28) and d.train_x.dtype == torch.float32
    assert d.val_x.shape == (1_000, 1, 28, 28) and d.test_x.shape == (10_000, 1, 28, 28)
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0
    assert set(d.train_y.unique().tolist()) == set(range(10))


def test_validation_split_is_fixed_and_disjoint_from_training(fashion_small):
    """The split depends only on split_seed: every trial validates on the same images."""
    split = load_fashion_mnist(train_subset=5_000)
    assert torch.equal(split.val_x[:1_000], fashion_small.val_x)  # loaded earlier, same split
    other = load_fashion_mnist(train_subset=5_000, split_seed=1)
    assert not torch.equal(other.val_y, split.val_y)
    train_rows = {row.numpy().tobytes() for row in split.train_x[:500].flatten(1)}
    val_rows = {row.numpy().tobytes() for row in split.val_x.flatten(1)}
    assert not train_rows & val_rows


def test_regression_task_is_the_seed_line():
    d = make_regression()
    assert torch.allclose(d.train_y, 0.7 * d.train_x + 0.3)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (800, 100, 100)


def test_prepare_copies_from_the_debian_package(tmp_path, monkeypatch):
    """With no files in the data folder, the Debian package's .gz files are decompressed."""
    debian = tmp_path / "debian"
    debian.mkdir()
    import gzip

    for name in data_module.FASHION_FILES:
        with gzip.open(debian / f"{name}.gz", "wb") as fh:
            fh.write(name.encode())
    monkeypatch.setattr(data_module, "DEBIAN_DIR", debian)
    raw = prepare_fashion_mnist(tmp_path / "data", log=lambda msg: None)
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == b"train-labels-idx1-ubyte"
    assert not list(raw.glob("*.partial"))


def test_prepare_says_what_to_do_when_no_source_works(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data_module, "_apt_install", lambda log: False)
    monkeypatch.setattr(data_module, "_torchvision_download", lambda root, log: False)
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "data", log=lambda msg: None)


def regression_datasets():
    """The regression task's line as Datasets: a user's factory that can be streamed."""
    return tuple(TensorDataset(*part) for part in regression())


@pytest.mark.parametrize("in_memory_mb", [pytest.param(1024, id="in memory"),
                                          pytest.param(0, id="streamed")])
def test_split_digests_follow_the_examples_each_split_holds(in_memory_mb):
    """The digests a trial's run records of its data: computed once per data object, the
    same for data loaded the same way, and another split seed changes those of the
    training and validation splits (not the test split's)."""
    def load(split_seed):
        return load_dataset("test_data:regression_datasets", split_seed=split_seed,
                            val_size=100, in_memory_mb=in_memory_mb)

    data = load(0)
    assert data.streaming == (in_memory_mb == 0)
    digests = split_digests(data)
    assert set(digests) == {"train", "val", "test"} and len(set(digests.values())) == 3
    assert split_digests(data) is digests and split_digests(data.to("cpu")) is digests
    assert split_digests(load(0)) == digests
    other = split_digests(load(1))
    assert other["test"] == digests["test"]
    assert other["train"] != digests["train"] and other["val"] != digests["val"]
