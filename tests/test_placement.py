"""`--workers auto` puts one worker on each visible GPU, each seeing only its own device.
The devices are faked the way a scheduler hands them out, through CUDA_VISIBLE_DEVICES in a
real process's environment; torch itself is not mocked (here it finds no CUDA, so the
trials train on the CPU, tagged with the device list each worker was given)."""

from __future__ import annotations

import os

import pytest

from optimsweep.errors import SpecError
from optimsweep.run.placement import Placement, place, visible_devices
from records import DATA, assert_invariant, finish, launch, start
from sweeps import line_sweep
from sweeps import load as load_spec

FOUR = ["0", "1", "2", "3"]


def no_cuda() -> int:
    return 0


def test_auto_is_one_worker_per_visible_device():
    assert place("auto", None, FOUR) == [Placement((d,)) for d in FOUR]


def test_auto_without_a_gpu_is_one_worker_on_the_cpu():
    assert place("auto", None, []) == [Placement()]
    assert place(None, None, []) == [Placement()]


def test_the_default_is_auto_only_where_several_devices_are_visible():
    assert len(place(None, None, FOUR)) == 4
    assert place(None, None, ["0"]) == [Placement(("0",))]


def test_gpus_per_worker_gives_each_worker_its_own_devices():
    assert place("auto", 2, FOUR) == [Placement(("0", "1")), Placement(("2", "3"))]
    assert place(1, 3, FOUR) == [Placement(("0", "1", "2"))]


def test_more_workers_than_devices_share_them_round_robin():
    assert [p.devices for p in place(6, None, ["0", "1"])] == [("0",), ("1",)] * 3


@pytest.mark.parametrize("workers, per, visible, message", [
    (1, 2, ["0"], "--gpus-per-worker: 2 is more than the 1 visible devices "
                  "(CUDA_VISIBLE_DEVICES=0)"),
    (1, 1, [], "--gpus-per-worker: 1 is more than the 0 visible devices "
               "(no CUDA device is visible)"),
    (3, 2, FOUR, "--workers 3 --gpus-per-worker 2 needs 6 devices, 4 are visible"),
    (0, None, FOUR, "--workers: 0 must be >= 1 or 'auto'"),
])
def test_placements_that_cannot_be_made_are_refused(workers, per, visible, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        place(workers, per, visible)


@pytest.mark.parametrize("listed, devices", [
    ("0,1,2,3", FOUR),
    ("GPU-8a1f,GPU-77c2", ["GPU-8a1f", "GPU-77c2"]),  # UUIDs, as Slurm may hand them out
    ("2,-1,3", ["2"]),  # CUDA stops at the first negative index
    ("", []),
])
def test_visible_devices_read_cuda_visible_devices_as_cuda_does(listed, devices):
    assert visible_devices({"CUDA_VISIBLE_DEVICES": listed}, cuda_count=no_cuda) == devices


def test_without_cuda_visible_devices_torch_counts_them():
    assert visible_devices({}, cuda_count=lambda: 2) == ["0", "1"]


def test_workers_auto_on_four_listed_devices_starts_four_each_seeing_one(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 4, "epochs": 30},
                      search_space={"optimizer": {"type": "categorical",
                                                  "choices": ["sgd", "adam"]},
                                    "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1},
                                    "batch_size": 16})
    process = start("sweep", path, "--workers", "auto", "--no-progress", cwd=tmp_path,
                    env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    code, _, err = finish(process, timeout=180)
    assert code == 0, err
    assert "4 workers; the devices each sees (CUDA_VISIBLE_DEVICES): 0 | 1 | 2 | 3" in err
    assert "CUDA_VISIBLE_DEVICES lists 4 devices but torch finds no CUDA" in err
    _, runs, trials = assert_invariant(load_spec(path))
    seen = {r.data.tags["optimsweep.pid"]: r.data.tags["optimsweep.cuda_visible_devices"]
            for r in runs}
    assert set(seen.values()) <= set(FOUR)  # one device each, of those listed
    assert len(set(seen.values())) == len(seen)  # no two workers on the same one
    assert len(seen) >= 2 and len(trials) == 4
    assert {r.data.tags["optimsweep.device"] for r in runs} == {"cpu"}


def test_workers_auto_without_a_gpu_is_one_worker_as_before(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    process = launch(["sweep", path, "--workers", "auto", "--no-progress"], tmp_path,
                     {**env, "OPTIMSWEEP_DATA": str(DATA)})
    code, _, err = finish(process, timeout=120)
    assert code == 0, err
    assert "workers;" not in err
    _, runs, _ = assert_invariant(load_spec(path))
    assert {r.data.tags["optimsweep.pid"] for r in runs} == {str(process.pid)}  # in-process
    assert {r.data.tags["optimsweep.device_index"] for r in runs} == {"cpu"}
    assert "optimsweep.cuda_visible_devices" not in runs[0].data.tags
    assert runs[0].data.tags["optimsweep.device_name"]


def test_more_gpus_per_worker_than_visible_is_one_line_and_nothing_created(tmp_path):
    path = line_sweep(tmp_path)
    process = start("sweep", path, "--gpus-per-worker", "2", cwd=tmp_path,
                    env={"CUDA_VISIBLE_DEVICES": "0"})
    code, out, err = finish(process)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: --gpus-per-worker: 2 is more than the 1 "
                                            "visible devices (CUDA_VISIBLE_DEVICES=0)")
    assert not (tmp_path / "mlruns").exists()

