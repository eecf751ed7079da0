"""Interrupted training goes on from its checkpoint: real processes killed or stopped after
6 of 10 epochs, then `sweep` again; the finished run equals an uninterrupted one, tensor for
tensor, and its curve holds each epoch once."""

from __future__ import annotations

import dataclasses
import pickle
import signal
from pathlib import Path

import pytest
import torch

from optimsweep.core import checkpoint, train
from optimsweep.core.artifacts import load_state_dict
from optimsweep.core.checkpoint import Checkpointer
from optimsweep.core.train import TrainConfig
from optimsweep.records.schema import Tag
from optimsweep.records.tracking import Tracker
from optimsweep.run import resume
from optimsweep.sweep.space import config_from_params
from records import (
    DATA,
    assert_invariant,
    finish,
    load_study,
    mlflow_runs,
    start,
    wait_until,
)
from sweeps import fashion_sweep
from sweeps import load as load_spec

EPOCHS = 10
# About a third of a second an epoch here: a signal sent once epoch 6 is reported lands in
# epoch 7.
ONE_TRIAL = {"budget": {"n_trials": 1, "epochs": EPOCHS},
             "data": {"train_subset": 3000, "val_size": 1000}}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIMSWEEP_DATA", str(DATA))


class Epochs:
    """How many epochs a trial's run has reported: polled cheaply (one client, the run
    looked up once) so the poll leaves the CPU to the process it watches."""

    def __init__(self, spec, trial_number: int = 0, role: str = "trial"):
        self.spec, self.trial, self.role, self.run_id = spec, str(trial_number), role, None
        self.client = None

    def __call__(self) -> int:
        if self.run_id is None:
            self.client, runs = mlflow_runs(self.spec, self.role)
            self.run_id = next(r.info.run_id for r in runs
                               if r.data.tags["optimsweep.trial_number"] == self.trial)
        return len(self.client.get_metric_history(self.run_id, "val_accuracy"))


def uninterrupted(spec, params: dict) -> dict[str, torch.Tensor]:
    """What the trial's config gives trained in one go, in this process."""
    config = config_from_params(spec.base_config(), params)
    return train.fit(config, train.load_data(config)).model.state_dict()


@pytest.mark.parametrize("signum, checkpoints", [(signal.SIGKILL, {"every": 0}),
                                                 (signal.SIGTERM, True)],
                         ids=["sigkill-every-epoch", "sigterm-default"])
def test_a_trial_stopped_after_6_of_10_epochs_trains_only_the_4_left(tmp_path, signum,
                                                                     checkpoints):
    path = fashion_sweep(tmp_path, checkpoint=checkpoints, **ONE_TRIAL)
    spec = load_spec(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    epochs = Epochs(spec)
    wait_until(lambda: epochs() >= 6, timeout=120,
               what="epoch 6 reported")
    process.send_signal(signum)
    finish(process)
    assert load_study(spec).trials[0].state.name in ("RUNNING", "FAIL")

    again = start("sweep", path, "--no-progress", cwd=tmp_path)
    code, _, err = finish(again, timeout=180)
    assert code == 0, err
    assert f"trial 1: resumed at epoch 6 of {EPOCHS} (from the checkpoint of trial 0)" in err
    client, runs, trials = assert_invariant(spec)
    first, retry = trials
    assert first.user_attrs["interrupted"] and retry.user_attrs["retry_of"] == 0
    assert retry.state.name == "COMPLETE"
    assert retry.user_attrs["resumed_from"] == {"trial": 0, "epoch": 6}
    assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
    run_id = retry.user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["optimsweep.resumed_from"] == "trial 0 epoch 6"
    for metric in ("val_accuracy", "train_loss", "lr", "best_val_accuracy"):  # each epoch once
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), metric
    assert client.get_metric_history(run_id, "val_accuracy")[-1].value == retry.value
    curve, best = ([m.value for m in sorted(client.get_metric_history(run_id, metric),
                                            key=lambda m: m.step)]
                   for metric in ("val_accuracy", "best_val_accuracy"))
    assert best == [max(curve[:epoch]) for epoch in range(1, EPOCHS + 1)]  # across the resume

    final = load_state_dict(client.download_artifacts(run_id, "state_dict.pt", str(tmp_path)))
    expected = uninterrupted(spec, retry.params)
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    # Finished: no checkpoint is left with either run, the state_dict stays.
    for run in runs:
        assert not client.list_artifacts(run.info.run_id, "checkpoints")
    assert [f.path for f in client.list_artifacts(run_id) if f.path == "state_dict.pt"]


# ---------------------------------------------------------------- bad checkpoints

SMALL = TrainConfig(task="regression", model="linear", optimizer="adam", epochs=4,
                    scheduler="plateau")


def a_checkpoint(tmp_path: Path, config: TrainConfig = SMALL) -> Path:
    """The real checkpoint a run of `config` writes after its first epoch."""
    written = []

    def sink(path, epoch):
        written.append(tmp_path / path.name)
        written[-1].write_bytes(path.read_bytes())

    train.fit(config, train.load_data(config), checkpointer=Checkpointer(sink, every=0))
    return written[0]


def load(path: Path, config: TrainConfig = SMALL, **checks):
    return checkpoint.load(path, dataclasses.asdict(config), "fp32", **checks)


def test_a_checkpoint_continues_its_run_exactly(tmp_path):
    config = dataclasses.replace(SMALL, epochs=6)
    state = train.load_checkpoint(a_checkpoint(tmp_path, config), config)
    assert state.epoch == 1 and [s["epoch"] for s in state.history] == [1]
    data = train.load_data(config)
    resumed = train.fit(config, data, resume=state)
    alone = train.fit(config, data)
    assert [s.val_loss for s in resumed.history] == [s.val_loss for s in alone.history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                 alone.model.state_dict().values(), strict=True))


class Watched(Tracker):
    """A real tracking store, read back after each write a resume makes to its run: what
    anyone reading the run (the UI, a scheduler waiting for an epoch of the run's own) can
    see between two writes."""

    def __init__(self, tracking_uri: str):
        super().__init__(tracking_uri)
        self.seen: list[tuple[str | None, int]] = []  # (the tag, epochs in the curve)

    def _look(self, run_id):
        run = self.client.get_run(run_id)
        self.seen.append((run.data.tags.get(Tag.RESUMED_FROM),
                          len(self.client.get_metric_history(run_id, "val_loss"))))

    def set_tag(self, run_id, key, value):
        super().set_tag(run_id, key, value)
        self._look(run_id)

    def log_epochs(self, run_id, history):
        super().log_epochs(run_id, history)
        self._look(run_id)


def test_a_resumed_runs_inherited_curve_is_never_seen_without_its_tag(tmp_path):
    config = dataclasses.replace(SMALL, epochs=6)
    state = train.load_checkpoint(a_checkpoint(tmp_path, config), config)
    tracker = Watched(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = tracker.client.create_run(tracker.experiment_id("resumed")).info.run_id
    history = resume.continue_run(tracker, run_id, resume.Found(state, "earlier", 0),
                                  "trial 1", config.epochs)
    assert [s.epoch for s in history] == [1]
    assert tracker.seen[-1] == ("trial 0 epoch 1", 1)
    assert all(tag is not None for tag, epochs in tracker.seen if epochs)


def test_a_torn_checkpoint_is_refused(tmp_path):
    path = a_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.Refused, match="unreadable"):
        load(path)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def test_a_tampered_pickle_is_refused_and_never_run(tmp_path):
    path = tmp_path / "epoch-0001.pt"
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "model": Payload()}))
    with pytest.raises(checkpoint.Refused, match="unreadable"):
        load(path)
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_config_model_or_code_is_refused(tmp_path):
    path = a_checkpoint(tmp_path)
    with pytest.raises(checkpoint.Refused, match="another config: lr 0.001 .now 0.01."):
        load(path, dataclasses.replace(SMALL, lr=0.01))
    with pytest.raises(checkpoint.Refused, match="another config: epochs 4 .now 8."):
        load(path, dataclasses.replace(SMALL, epochs=8))  # another LR schedule
    with pytest.raises(checkpoint.Refused, match="trained in fp32"):
        checkpoint.load(path, dataclasses.asdict(SMALL), "bf16")
    other_model = torch.nn.Linear(3, 1)
    with pytest.raises(checkpoint.Refused, match="from another model"):
        load(path, model=other_model)
    with pytest.raises(checkpoint.Refused, match="another version of the model code"):
        load(path, user_code={"model": "mymodels 2.0"})
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "code": "0" * 16}, path)
    with pytest.raises(checkpoint.Refused, match="another version of the training code"):
        load(path)


def test_a_torn_checkpoint_in_a_study_is_noted_and_the_trial_starts_over(tmp_path):
    path = fashion_sweep(tmp_path, checkpoint={"every": 0},
                         budget={"n_trials": 1, "epochs": 4},
                         data={"train_subset": 2000, "val_size": 500})
    spec = load_spec(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    epochs = Epochs(spec)
    wait_until(lambda: epochs() >= 2, timeout=120,
               what="epoch 2 reported")
    process.kill()
    finish(process)
    (torn,) = (tmp_path / "mlruns" / "artifacts").rglob("checkpoints/epoch-*.pt")
    torn.write_bytes(torn.read_bytes()[:1000])

    code, _, err = finish(start("sweep", path, "--no-progress", cwd=tmp_path))
    assert code == 0, err
    assert f"note: trial 1: checkpoint checkpoints/{torn.name} of run" in err
    assert "refused: unreadable" in err and "resumed at" not in err
    client, runs, (first, retry) = assert_invariant(spec)
    assert retry.state.name == "COMPLETE" and "resumed_from" not in retry.user_attrs
    steps = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"],
                                                       "val_accuracy")]
    assert steps == [1, 2, 3, 4]
    assert not list((tmp_path / "mlruns" / "artifacts").rglob("checkpoints/*.pt"))


# ---------------------------------------------------------------- everything that trains


def test_train_stopped_after_6_epochs_goes_on_from_its_checkpoint(tmp_path):
    """`optimsweep train --save` checkpoints beside its target; SIGTERM writes the last
    finished epoch; the same command again trains the 4 epochs left, and ends with the
    weights of an uninterrupted run."""
    flags = ["--optimizer", "adam", "--lr", "0.002", "--scheduler", "cosine",
             "--epochs", EPOCHS, "--train-subset", 3000, "--val-size", 1000,
             "--save", tmp_path / "model.pt"]
    process = start("train", *flags, cwd=tmp_path)
    wait_until(lambda: f"Epoch 6/{EPOCHS}" in process.output_so_far(), timeout=120,
               what="epoch 6 printed")
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 143
    assert (tmp_path / "model.pt.checkpoint").exists() and not (tmp_path / "model.pt").exists()

    code, out, err = finish(start("train", *flags, cwd=tmp_path), timeout=180)
    assert code == 0, err
    assert f"resumed at epoch 6 of {EPOCHS} from" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("Epoch")] == [
        f"{e}/{EPOCHS}" for e in range(7, EPOCHS + 1)]
    assert not (tmp_path / "model.pt.checkpoint").exists()
    config = TrainConfig(optimizer="adam", lr=0.002, scheduler="cosine", epochs=EPOCHS,
                         train_subset=3000, val_size=1000)
    expected = train.fit(config, train.load_data(config)).model.state_dict()
    final = load_state_dict(tmp_path / "model.pt")
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def confirm_runs(spec):
    return mlflow_runs(spec, "confirm")


def test_confirm_stopped_mid_seed_goes_on_from_its_checkpoint(tmp_path):
    path = fashion_sweep(tmp_path, budget={"n_trials": 1, "epochs": 6},
                         data={"train_subset": 3000, "val_size": 1000})
    spec = load_spec(path)
    assert finish(start("sweep", path, "--no-progress", cwd=tmp_path))[0] == 0

    process = start("confirm", path, "--top-k", 1, "--seeds", 1, cwd=tmp_path)
    confirm_epochs = Epochs(spec, 0, "confirm")
    wait_until(lambda: confirm_epochs() >= 3, timeout=120, what="confirm epoch 3")
    process.send_signal(signal.SIGTERM)
    assert finish(process)[0] == 143

    code, out, err = finish(start("confirm", path, "--top-k", 1, "--seeds", 1, cwd=tmp_path))
    assert code == 0, err
    assert "confirm trial 000 seed 1: resumed at epoch 3 of 6 (from the checkpoint of run" in err
    client, runs = confirm_runs(spec)
    (done,) = [r for r in runs if r.info.status == "FINISHED"]
    assert [m.step for m in client.get_metric_history(done.info.run_id, "val_accuracy")] == \
        list(range(1, 7))
    assert done.data.tags["optimsweep.resumed_from"].endswith("epoch 3")
    assert [r.info.status for r in runs].count("FAILED") == 1
    assert all(not client.list_artifacts(r.info.run_id, "checkpoints") for r in runs)
    assert_invariant(spec)


def test_a_fused_group_killed_mid_training_resumes_each_member(tmp_path):
    """Two trials trained as one fused model, SIGKILLed after epoch 2 of 5: each retry goes
    on from its own member's checkpoint, and ends where the config trained alone ends, within
    the documented fused tolerance."""
    path = fashion_sweep(tmp_path, fuse=2, checkpoint={"every": 0},
                         budget={"n_trials": 2, "epochs": 5},
                         data={"train_subset": 2000, "val_size": 1000},
                         search_space={"optimizer": {"type": "categorical",
                                                     "choices": ["momentum"]},
                                       "lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    spec = load_spec(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    members = [Epochs(spec, 0), Epochs(spec, 1)]
    wait_until(lambda: min(epochs() for epochs in members) >= 2, timeout=120,
               what="epoch 2 of both members")
    process.kill()
    finish(process)

    code, _, err = finish(start("sweep", path, "--no-progress", cwd=tmp_path), timeout=180)
    assert code == 0, err
    client, runs, trials = assert_invariant(spec)
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == [0, 1]
    for retry in retries:
        epoch = retry.user_attrs["resumed_from"]["epoch"]
        assert epoch >= 2 and f"trial {retry.number}: resumed at epoch {epoch} of 5" in err
        run_id = retry.user_attrs["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == \
            [1, 2, 3, 4, 5]
        config = config_from_params(spec.base_config(), retry.params)
        alone = train.fit(config, train.load_data(config))
        curve = [m.value for m in client.get_metric_history(run_id, "val_loss")]
        assert curve == pytest.approx([s.val_loss for s in alone.history], rel=1e-4)
        final = load_state_dict(client.download_artifacts(run_id, "state_dict.pt",
                                                          str(tmp_path / str(retry.number))))
        for name, tensor in alone.model.state_dict().items():
            torch.testing.assert_close(final[name], tensor, rtol=1e-3, atol=1e-3)
