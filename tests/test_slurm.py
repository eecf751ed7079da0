"""A study's workers as a real Slurm job array: `optimsweep slurm FILE --array N --submit` on
a one-machine Slurm (the `slurm` fixture: munge, slurmctld and slurmd started by the tests),
against a real PostgreSQL and MLflow server (`servers`). The tasks are preempted for real
(`scontrol requeue`, and the time limit's warning as Slurm sends it, USR1 to the task's
shell alone) while they train; the records must hold, and no work be lost."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from optimsweep.core import train
from optimsweep.core.artifacts import load_state_dict
from optimsweep.sweep.check import load_spec
from optimsweep.sweep.space import config_from_params
from records import DATA, assert_invariant, finish, launch, run_cli

SPACE = {"optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
         "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
         "batch_size": 16}


class Submitter:
    """A user's shell on the login node: the two store URLs exported (the database's
    password in a password file, as `make services` prints them), and the password itself
    in PGPASSWORD too, as some users keep it: none of it may reach Slurm's records."""

    def __init__(self, servers, slurm, tmp_path: Path):
        self.password = Path(servers.folder, "password").read_text().strip()
        self.slurm, self.folder = slurm, tmp_path
        self.env = slurm.environ({**os.environ, "PYTHONUNBUFFERED": "1",
                                  "OPTIMSWEEP_DATA": str(DATA),
                                  "OPTIMSWEEP_STORAGE": servers.storage,
                                  "MLFLOW_TRACKING_URI": servers.tracking_uri,
                                  "PGPASSWORD": self.password})
        self.outputs: list[str] = []

    def sweep_file(self, name: str, **doc) -> Path:
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "sampler": {"name": "random"},
                                        "pruner": {"name": "none"}, **doc}, sort_keys=False))
        return path

    def spec(self, path: Path):
        return dataclasses.replace(load_spec(path), storage=self.env["OPTIMSWEEP_STORAGE"],
                                   tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def optimsweep(self, *args) -> tuple[int, str, str]:
        code, out, err = finish(launch(list(args), self.folder, self.env), timeout=120)
        self.outputs += [out, err]
        return code, out, err

    def submit(self, path: Path, *args) -> str:
        code, out, err = self.optimsweep("slurm", path, "--submit", *args)
        assert code == 0, err
        return re.search(r"submitted job array (\d+)", out)[1]

    def scontrol(self, *args) -> str:
        return self.slurm.run("scontrol", *args)

    def tasks(self, job: str) -> dict[int, dict[str, str]]:
        """Each array task's record as Slurm keeps it (finished ones for MinJobAge)."""
        records = self.slurm.run("scontrol", "show", "job", job, "-o", check=False)
        tasks = {}
        for line in records.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "ArrayTaskId" in fields:
                tasks[int(fields["ArrayTaskId"])] = fields
        return tasks

    def wait(self, job: str, timeout: float = 300, each=None) -> dict[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.slurm.run("squeue", "-h", "-j", job, check=False).strip():
                return self.tasks(job)
            if each is not None:
                each()
            time.sleep(0.3)
        raise AssertionError(f"job array {job} still queued after {timeout} s:\n"
                             + self.slurm.run("squeue", check=False))

    def logs(self, job: str) -> dict[int, str]:
        return {int(p.name.rsplit("_", 1)[1].removesuffix(".out")): p.read_text()
                for p in (self.folder / "slurm" / "logs").glob(f"*-{job}_*.out")}

    def assert_no_password(self, job: str) -> None:
        """Not in the script, nor in Slurm's saved copy of the job and its environment, nor
        in what squeue and scontrol show, nor in any output."""
        secret = self.password.encode()
        state = [p.read_bytes() for p in (self.slurm.folder / "state").rglob("*")
                 if p.is_file()]
        assert any(b"OPTIMSWEEP_STORAGE" in s for s in state)  # the job's environment is there
        shown = [self.slurm.run("scontrol", "show", "job", "-d", job, check=False),
                 self.slurm.run("squeue", "-a", "-o", "%all", check=False)]
        scripts = [p.read_bytes() for p in (self.folder / "slurm").glob("*.sbatch")]
        assert scripts and not [s for s in scripts + state if secret in s]
        assert not [o for o in shown + self.outputs + list(self.logs(job).values())
                    if self.password in o]


@pytest.fixture
def submitter(servers, slurm, tmp_path):
    return Submitter(servers, slurm, tmp_path)


def test_a_4_task_array_finishes_the_study_exactly(submitter):
    path = submitter.sweep_file("array4", task="regression", model="linear",
                                metric="val_loss", budget={"n_trials": 8, "epochs": 5},
                                search_space=SPACE)
    job = submitter.submit(path, "--array", 4)
    tasks = submitter.wait(job)
    assert sorted(tasks) == [0, 1, 2, 3]
    assert {t["ExitCode"] for t in tasks.values()} == {"0:0"}
    _, runs, trials = assert_invariant(submitter.spec(path))
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)
    ran_by = {r.data.tags["optimsweep.slurm_job"].split()[0] for r in runs}
    assert ran_by <= {f"{job}_{i}" for i in range(4)} and len(ran_by) >= 2
    for task, log in submitter.logs(job).items():
        assert f"optimsweep: task {job}_{task}, restart 0" in log
        assert "budget 8 of 8 used" in log
    submitter.assert_no_password(job)


EPOCHS = 6


def test_every_task_preempted_twice_mid_trial_loses_no_work(submitter, tmp_path):
    """Each of 4 tasks is stopped twice while it trains a trial: once requeued as a
    preemption requeues it (SIGTERM to every process), once warned of its time limit as
    `--signal=B:USR1@S` warns it (USR1 to its shell alone), which requeues itself. Every
    stop costs only the epoch in progress: each retry goes on from its checkpoint, and
    its final weights equal its config's trained in one go, bit for bit."""
    path = submitter.sweep_file(
        "preempted", task="fashion_mnist", model="mlp", metric="val_accuracy",
        budget={"n_trials": 4, "epochs": EPOCHS}, checkpoint={"every": 0},
        data={"train_subset": 6000, "val_size": 1000},
        search_space={"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                      "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
                      "batch_size": 32})
    spec = submitter.spec(path)
    job = submitter.submit(path, "--array", 4)
    client = MlflowClient(spec.tracking_uri)
    stops: Counter[int] = Counter()  # stops sent, by task
    stopped: set[str] = set()  # runs stopped

    def preempt() -> None:
        """Stop each task's life (restart 0 and 1) once it has trained an epoch of its
        own in a trial."""
        experiment = client.get_experiment_by_name(spec.name)
        if experiment is None:
            return
        for run in client.search_runs([experiment.experiment_id],
                                      "attributes.status = 'RUNNING' and "
                                      "tags.`optimsweep.role` = 'trial'"):
            task, restart = run.data.tags["optimsweep.slurm_job"].split(" restart ")
            index = int(task.split("_")[1])
            if run.info.run_id in stopped or stops[index] != int(restart) or stops[index] >= 2:
                continue
            resumed = run.data.tags.get("optimsweep.resumed_from", "epoch 0").split()[-1]
            if len(client.get_metric_history(run.info.run_id, "val_accuracy")) < \
                    int(resumed) + 1:
                continue
            if stops[index] == 0:
                submitter.scontrol("requeue", task)
            else:  # what Slurm sends LEAD seconds before the time limit
                submitter.slurm.run("scancel", "--batch", "--signal=USR1", task)
            stops[index] += 1
            stopped.add(run.info.run_id)

    tasks = submitter.wait(job, timeout=420, each=preempt)
    assert stops == {0: 2, 1: 2, 2: 2, 3: 2}, "each task stopped twice mid-trial"
    assert {t["Restarts"] for t in tasks.values()} == {"2"}
    assert {t["ExitCode"] for t in tasks.values()} == {"0:0"}
    client, runs, trials = assert_invariant(spec)
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(counted) == 4 and all(t.state.name == "COMPLETE" for t in counted)
    assert len(interrupted) == 8
    logs = "".join(submitter.logs(job).values())
    for task in range(4):
        for restart in range(3):
            assert f"optimsweep: task {job}_{task}, restart {restart}," in logs
    assert logs.count("the time limit is near: requeueing") == 4
    # Each stop cost at most the epoch in progress: an interrupted trial's recorded epochs
    # (its checkpoint's included) are where its retry went on from, and it had finished at
    # most one more (logged, then stopped before its state was kept).
    recorded = {t.number: len(t.intermediate_values) for t in trials}
    table = {t.number: (t.state.name, t.user_attrs.get("retry_of"),
                        t.user_attrs.get("resumed_from"), recorded[t.number])
             for t in trials}  # shown when an assertion below fails
    for trial in interrupted:
        logged = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_accuracy")
        assert len(logged) - recorded[trial.number] <= 1, table
        if not recorded[trial.number]:
            continue
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == trial.number]
        went_on = retry.user_attrs["resumed_from"]
        assert went_on["epoch"] == recorded[trial.number], f"trial {trial.number}: {table}"
        assert (f"trial {retry.number}: resumed at epoch {went_on['epoch']} of {EPOCHS} "
                f"(from the checkpoint of trial {went_on['trial']})") in logs
    for trial in counted:
        run_id = trial.user_attrs["mlflow_run_id"]
        steps = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # each epoch once
        if trial.user_attrs.get("resumed_from"):
            final = load_state_dict(client.download_artifacts(run_id, "state_dict.pt",
                                                              str(tmp_path)))
            config = config_from_params(spec.base_config(), trial.params)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the task trained: one thread, its one CPU
            try:
                expected = train.fit(config, train.load_data(config)).model.state_dict()
            finally:
                torch.set_num_threads(threads)
            for name, tensor in expected.items():
                assert torch.equal(final[name], tensor), (trial.number, name)
    assert any(t.user_attrs.get("resumed_from") for t in counted)
    submitter.assert_no_password(job)


# ---------------------------------------------------------------- bad input

def test_a_partition_slurm_does_not_know_is_its_own_answer_in_one_line(submitter):
    path = submitter.sweep_file("nopart", task="regression", model="linear",
                                metric="val_loss", budget={"n_trials": 1, "epochs": 1},
                                search_space=SPACE)
    code, _, err = submitter.optimsweep("slurm", path, "--array", 2, "--partition", "nosuch",
                                        "--submit")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: sbatch refused slurm/nopart.sbatch: error: invalid partition specified: "
        "nosuch")
    assert not submitter.slurm.run("squeue", "-h", check=False).strip()


@pytest.mark.parametrize("args, message", [
    (["--array", "0"], "--array: 0 must be >= 1 (array tasks, one worker each)"),
    (["--array", "2", "--gpus-per-task", "1", "--gpus-per-worker", "2"],
     "--gpus-per-worker: 2 is more than the 1 GPUs each task asks for (--gpus-per-task)"),
    (["--array", "2", "--time", "soon"], "--time: 'soon' is not a Slurm time"),
], ids=["array-0", "gpus-per-worker", "time"])
def test_bad_array_flags_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, args,
                                                        message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"task": "regression", "model": "linear",
                                    "metric": "val_loss", "search_space": SPACE}))
    code, _, err = run_cli(capsys, "slurm", path, *args)
    assert code == 2 and err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "slurm").exists()


def test_without_slurms_commands_the_script_is_written_and_submitting_says_so(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"task": "regression", "model": "linear",
                                    "metric": "val_loss", "search_space": SPACE}))
    code, out, err = run_cli(capsys, "slurm", path, "--array", "2", "--submit")
    *notes, last = err.splitlines()
    assert code == 2 and all(n.startswith("note: ") for n in notes)  # the stores are files
    assert last.startswith("error: sbatch: not found: Slurm's commands are not on PATH")
    assert (tmp_path / "slurm" / "s.sbatch").exists()


def test_a_password_in_a_store_url_is_refused_before_any_script(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIMSWEEP_STORAGE", "postgresql://u:hunter2@db.example/optuna")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"task": "regression", "model": "linear",
                                    "metric": "val_loss", "search_space": SPACE}))
    code, out, err = run_cli(capsys, "slurm", path, "--array", "2")
    assert code == 2 and "hunter2" not in out + err and len(err.splitlines()) == 1
    assert "postgresql://u:***@db.example/optuna holds a password" in err
    assert "passfile=PATH" in err
    assert not (tmp_path / "slurm").exists()


def test_the_script_asks_slurm_for_what_a_preemptible_worker_needs(tmp_path, capsys,
                                                                   monkeypatch):
    """Read as Slurm reads it: the #SBATCH lines."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"task": "regression", "model": "linear",
                                    "metric": "val_loss", "search_space": SPACE,
                                    "store_timeout": 45}))
    code, _, err = run_cli(capsys, "slurm", path, "--array", "8", "--gpus-per-task", "2",
                           "--partition", "gpu", "--time", "4:00:00")
    assert code == 0, err
    text = (tmp_path / "slurm" / "s.sbatch").read_text()
    asked = [line.split(None, 1)[1] for line in text.splitlines()
             if line.startswith("#SBATCH ")]
    assert asked == ["--job-name=optimsweep-s", "--array=0-7", "--ntasks=1",
                     f"--output={tmp_path}/slurm/logs/%x-%A_%a.out", "--open-mode=append",
                     "--export=NONE", "--requeue", "--signal=B:USR1@75", "--partition=gpu",
                     "--time=4:00:00", "--gpus-per-task=2"]
    assert "sweep" in text and "--workers auto" in text  # one worker per GPU of the task
    result = subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "s.sbatch")])
    assert result.returncode == 0
