"""Beyond one machine: workers in separate folders (no shared mlruns/) join one study
through a real PostgreSQL and a real `mlflow server`, as docs/guide/scaling-out.md sets them up.
The URLs carry the database password, as a user's would, to check it is never kept or
shown."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from optimsweep import services
from optimsweep.records.tracking import Tracker
from optimsweep.sweep.check import load_spec
from records import (
    DATA,
    assert_invariant,
    finish,
    launch,
    load_study,
    mlflow_runs,
    run_cli,
    running_trial,
    wait_until,
)

# One PostgreSQL and one MLflow server for all these tests (`servers` in conftest): `make
# test`'s parallel workers run them in one worker (conftest), which alone starts them.
TrialState = optuna.trial.TrialState


def server_sweep(folder: Path, name: str, *, n_trials: int, epochs: int, **extra) -> Path:
    """A regression sweep with no stores in it: the environment points at the servers."""
    doc = {"name": name, "task": "regression", "model": "linear", "metric": "val_loss",
           "sampler": {"name": "random"}, "pruner": {"name": "none"},
           "budget": {"n_trials": n_trials, "epochs": epochs},
           "search_space": {
               "optimizer": {"type": "categorical", "choices": ["sgd", "momentum", "adam"]},
               "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
               "batch_size": 16},
           **extra}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Workers:
    """`optimsweep sweep FILE` processes, each in its own folder with its own copy of the
    file, pointed at the servers by the two environment variables."""

    def __init__(self, servers, tmp_path: Path):
        self.password = Path(servers.folder, "password").read_text().strip()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "OPTIMSWEEP_STORAGE": servers.with_password(servers.storage),
                    "MLFLOW_TRACKING_URI": servers.tracking_uri.replace(
                        "//", f"//{services.USER}:{self.password}@")}
        self.tmp_path = tmp_path
        self.outputs: list[str] = []

    def spec(self, sweep: Path):
        return dataclasses.replace(load_spec(sweep), storage=self.env["OPTIMSWEEP_STORAGE"],
                                   tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def start(self, folder: str, *args, host: str | None = None):
        """A worker on this machine, or on the machine named `host` as far as host names
        tell."""
        cwd = self.tmp_path / folder
        cwd.mkdir(exist_ok=True)
        return launch(list(args), cwd, self.env, hostname=host)

    def finish(self, process, timeout: float = 240) -> tuple[int, str]:
        code, out, err = finish(process, timeout)
        self.outputs += [out, err]
        return code, err

    def run(self, folder: str, *args, timeout: float = 240) -> tuple[int, str]:
        return self.finish(self.start(folder, *args), timeout)

    def run_here(self, capfd, monkeypatch, folder: str, *args) -> tuple[int, str]:
        """`optimsweep ARGS` in this process, in FOLDER with the workers' environment, where
        no process is what fails (saving a process start); its output is checked for the
        password as theirs is (capfd: what is written to the file descriptors too)."""
        cwd = self.tmp_path / folder
        cwd.mkdir(exist_ok=True)
        with monkeypatch.context() as here:
            here.chdir(cwd)
            for name in ("OPTIMSWEEP_STORAGE", "MLFLOW_TRACKING_URI"):
                if name in self.env:  # else the sweep file's own store
                    here.setenv(name, self.env[name])
                else:
                    here.delenv(name, raising=False)
            code, out, err = run_cli(capfd, *args)
        self.outputs += [out, err]
        return code, err

    def assert_no_password(self, servers) -> None:
        """Not in any output, nor anywhere in what the servers hold: both databases dumped
        whole (every tag, param, metric, Optuna attribute) and every artifact file."""
        dumps = [subprocess.run([services.pg_tool("pg_dump"), servers.database_url(db)],
                                capture_output=True, check=True).stdout
                 for db in ("optuna", "mlflow")]
        assert all(b"optimsweep.role" in d or b"trial_user_attributes" in d for d in dumps)
        files = [p.read_bytes() for p in Path(servers.folder, "artifacts").rglob("*")
                 if p.is_file()]
        assert files
        secret = self.password.encode()
        assert not [o for o in self.outputs if self.password in o]
        assert not [d for d in dumps + files if secret in d]


def peak_connections(servers, processes, sampled: list) -> None:
    """Connections to the study database by client, sampled while the workers run."""
    while any(p.poll() is None for p in processes):
        sampled.append(services.connections(servers))
        time.sleep(0.2)


def test_three_workers_in_separate_folders_run_one_study_exactly(servers, tmp_path,
                                                                capfd, monkeypatch):
    # Three workers (four before): more than two already start at once, share the budget and
    # each hold their own pool; a fourth only added a process start on a 2-core machine.
    # 12 trials keep the 4 trials a worker that four workers had.
    workers = Workers(servers, tmp_path)
    files = [server_sweep(tmp_path / f"w{i}", "four", n_trials=12, epochs=2)
             for i in range(3)]
    processes = [workers.start(f"w{i}", "sweep", files[i].name, "--no-progress")
                 for i in range(3)]
    sampled: list[dict] = []
    peak_connections(servers, processes, sampled)
    for p in processes:
        code, err = workers.finish(p)
        assert code == 0, err

    spec = workers.spec(files[0])
    client, children, trials = assert_invariant(spec)
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # the budget was shared
    (parent,) = mlflow_runs(spec, "study")[1]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 12
    assert len(client.search_experiments(filter_string="name = 'four'")) == 1

    # Every state_dict comes back through the server (no shared disk) and loads plainly.
    fresh = tmp_path / "elsewhere"
    for run in children:
        path = client.download_artifacts(run.info.run_id, "state_dict.pt", str(fresh))
        assert set(torch.load(path, weights_only=True)) == {"weights", "bias"}
    # No worker held more than its pool of 2 connections to the study database, plus one
    # while it first opened it.
    pool = [n for sample in sampled for name, n in sample.items()
            if name.startswith("optimsweep ")]
    assert pool and max(pool) <= 2
    per_pid: list[int] = []
    for sample in sampled:
        pids = {name.rsplit(" ", 1)[-1] for name in sample if "optimsweep" in name}
        per_pid += [sum(n for name, n in sample.items() if name.endswith(" " + pid))
                    for pid in pids]
    assert max(per_pid) <= 3

    # export works against the servers from yet another folder (in this process: nothing
    # fails here).
    code, err = workers.run_here(capfd, monkeypatch, "elsewhere", "export", files[0],
                                 "--out", "best")
    assert code == 0, err
    state = torch.load(tmp_path / "elsewhere" / "best" / "state_dict.pt", weights_only=True)
    assert state["weights"].numel() == 1
    assert_invariant(spec)
    workers.assert_no_password(servers)


def test_two_workers_pause_and_promote_one_study_exactly(servers, tmp_path):
    # Successive halving with promotion across workers in separate folders: a trial paused
    # by one worker is promoted by whichever is free, from its checkpoint on the tracking
    # server. 9 trials of 9 epochs, rungs at epochs 1 and 3, all of one config: values tie
    # and the earlier trial ranks first, so trial 2, paused at epoch 1 behind trials 0 and
    # 1, is promoted once the ninth arrival makes that rung's top third three.
    workers = Workers(servers, tmp_path)
    asha = {"pruner": {"name": "asha", "min_resource": 1, "reduction_factor": 3},
            "checkpoint": {"every": 0},
            "search_space": {"optimizer": {"type": "categorical", "choices": ["adam"]},
                             "lr": {"type": "categorical", "choices": [1.0e-2]},
                             "batch_size": 16}}
    files = [server_sweep(tmp_path / f"w{i}", "halving", n_trials=9, epochs=9, **asha)
             for i in range(2)]
    processes = [workers.start(f"w{i}", "sweep", files[i].name, "--no-progress")
                 for i in range(2)]
    for p in processes:
        code, err = workers.finish(p)
        assert code == 0, err
    spec = workers.spec(files[0])
    client, children, trials = assert_invariant(spec)
    assert len(trials) == 9 and len({t.user_attrs["pid"] for t in trials}) == 2
    assert trials[2].user_attrs["promotions"] == 1 and trials[0].state == TrialState.COMPLETE
    for t in trials:
        history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_loss")
        assert [m.step for m in history] == sorted(t.intermediate_values)
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["paused_at"] in (1, 3)
    workers.assert_no_password(servers)


def test_worker_killed_on_another_host_is_failed_and_retried_within_grace(servers, tmp_path):
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        message = "another hostname needs `unshare --uts` (root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    workers = Workers(servers, tmp_path)
    beat = {"interval": 1, "grace_period": 3}
    a = server_sweep(tmp_path / "a", "killed", n_trials=2, epochs=12, heartbeat=beat)
    b = server_sweep(tmp_path / "b", "killed", n_trials=2, epochs=12, heartbeat=beat)
    spec = workers.spec(a)
    doomed = workers.start("b", "sweep", b.name, "--no-progress", host="other-host")

    def doomed_trial_mid_run():
        for t in load_study(spec).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") == "other-host" and len(t.intermediate_values) >= 2:
                return t
        return None

    victim = wait_until(doomed_trial_mid_run, timeout=60, what="a trial of the other host")
    survivor = workers.start("a", "sweep", a.name, "--no-progress")
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    workers.finish(doomed)

    # The survivor's claim finds no heartbeat for the grace period: it fails the trial.
    failed = wait_until(lambda: load_study(spec).trials[victim.number].state == TrialState.FAIL
                        and load_study(spec).trials[victim.number], timeout=30,
                        what="the killed trial to be failed")
    assert time.monotonic() - killed_at < beat["grace_period"] + 15
    code, err = workers.finish(survivor)
    assert code == 0, err

    client, children, trials = assert_invariant(spec)
    failed = trials[victim.number]
    assert failed.user_attrs["interrupted"] and "no heartbeat" in failed.user_attrs["error"]
    run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags["optimsweep.error"]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.system_attrs["failed_trial"] == victim.number  # Optuna's own retry
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["optimsweep.retry_of"] == str(victim.number)
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 2 and all(t.state == TrialState.COMPLETE for t in counted)
    workers.assert_no_password(servers)


def test_a_worker_killed_mid_trial_is_resumed_from_its_checkpoint_by_a_worker_elsewhere(
        servers, tmp_path):
    """Worker A is SIGKILLed once its trial has checkpointed; worker B, in another folder
    with its own copy of the file and no path to the server's artifacts but HTTP, fails
    the dead trial, retries it from that checkpoint and removes every checkpoint after."""
    workers = Workers(servers, tmp_path)
    workers.env["OPTIMSWEEP_DATA"] = str(DATA)
    epochs = 4
    # Real FashionMNIST, about 0.3 s an epoch here.
    fashion = {"task": "fashion_mnist", "model": "mlp", "metric": "val_accuracy",
               "data": {"train_subset": 2000, "val_size": 500}, "checkpoint": {"every": 0},
               "search_space": {"optimizer": "adam",
                                "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2}}}
    a, b = (server_sweep(tmp_path / w, "resumed", n_trials=1, epochs=epochs, **fashion)
            for w in ("a", "b"))
    spec = workers.spec(a)
    client = MlflowClient(spec.tracking_uri)
    doomed = workers.start("a", "sweep", a.name, "--no-progress")
    try:
        # One study object polled (not one opened per poll): the workers have the CPUs.
        study = wait_until(lambda: load_study(spec), timeout=60, what="the study")
        victim = wait_until(
            lambda: next((t for t in study.get_trials(deepcopy=False, states=(
                TrialState.RUNNING,)) if len(t.intermediate_values) >= 2), None),
            timeout=120, what="epoch 2 reported")
    finally:
        doomed.kill()
        workers.finish(doomed)
    run_id = victim.user_attrs["mlflow_run_id"]
    # Its checkpoint is kept by the server, reached over HTTP: in neither A's nor B's folder.
    assert tmp_path not in Path(servers.folder).parents
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    written = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert written and not list(tmp_path.rglob("*.pt"))

    code, err = workers.run("b", "sweep", b.name, "--no-progress", timeout=180)
    assert code == 0, err
    line = re.search(rf"trial 1: resumed at epoch (\d) of {epochs} \(from the checkpoint of "
                     r"trial 0\)", err)
    assert line, err
    epoch = int(line[1])
    assert 2 <= epoch < epochs and f"checkpoints/epoch-{epoch:04d}.pt" in written
    client, runs, trials = assert_invariant(spec)
    first, retry = trials
    assert first.user_attrs["interrupted"] and retry.user_attrs["retry_of"] == 0
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs["resumed_from"] == {"trial": 0, "epoch": epoch}
    retry_id = retry.user_attrs["mlflow_run_id"]
    assert client.get_run(retry_id).data.tags["optimsweep.resumed_from"] == \
        f"trial 0 epoch {epoch}"
    steps = [m.step for m in client.get_metric_history(retry_id, "val_accuracy")]
    assert sorted(steps) == list(range(1, epochs + 1))  # each epoch once
    # Finished: no checkpoint is left, through the API or on the server's disk.
    for run in runs:
        assert not client.list_artifacts(run.info.run_id, "checkpoints")
    assert not list(Path(servers.folder, "artifacts").rglob("checkpoints/*.pt"))
    assert not list(tmp_path.rglob("*.pt"))  # B downloaded it into a temporary folder
    assert "state_dict.pt" in [f.path for f in client.list_artifacts(retry_id)]
    workers.assert_no_password(servers)


def test_tracking_server_and_database_restarted_mid_study_lose_nothing(servers, tmp_path):
    """Back within store_timeout (the tracking server, then PostgreSQL restarted mid-trial):
    the retries ride it out, the sweep ends normally and nothing is lost."""
    workers = Workers(servers, tmp_path)
    sweep = server_sweep(tmp_path / "w", "restart", n_trials=4, epochs=5, store_timeout=30)
    spec = workers.spec(sweep)
    process = workers.start("w", "sweep", sweep.name, "--no-progress")
    wait_until(lambda: len(load_study(spec).trials) >= 2, timeout=60, what="a second trial")
    services.stop_mlflow(servers.folder)  # down while a trial logs its epochs
    services.start_mlflow(servers)
    services.restart_postgres(servers.folder)  # and the database under both
    code, err = workers.finish(process)
    assert code == 0 and "error" not in err, err

    client, children, trials = assert_invariant(spec)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, [
        (t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    for t in trials:  # every epoch and the weights of every trial made it
        run_id = t.user_attrs["mlflow_run_id"]
        assert len(client.get_metric_history(run_id, "val_loss")) == 5
        assert "state_dict.pt" in [a.path for a in client.list_artifacts(run_id)]
    workers.assert_no_password(servers)


def test_tracking_server_gone_past_store_timeout_stops_worker_then_next_sweep_repairs(
        servers, tmp_path, capfd, monkeypatch):
    """Stopped mid-trial and not back within store_timeout: the worker stops with one line
    (exit 3) within about store_timeout, its trial failed and uncounted; with the server
    back, the next sweep repairs the records and finishes the budget exactly."""
    store_timeout = 2  # MLflow's retries then wait 1 + 2 s (3 s would be 1 + 2 + 4 s)
    # An earlier sweep in this process (store_timeout 60, as in-process tests run) leaves
    # nothing in os.environ for the worker to inherit: it keeps to its own timeout.
    Tracker(servers.tracking_uri, store_timeout=60).experiment_id("an earlier sweep")
    assert not [var for var in os.environ if var.startswith("MLFLOW_HTTP_REQUEST_")]
    workers = Workers(servers, tmp_path)
    # A stack dump of every thread on SIGABRT, should the worker not stop in time.
    workers.env["PYTHONFAULTHANDLER"] = "1"
    # One trial: the retry of the victim is then the whole budget, which the repairing sweep
    # only runs if the victim was left uncounted (and runs exactly once).
    sweep = server_sweep(tmp_path / "w", "gone", n_trials=1, epochs=40,
                         store_timeout=store_timeout)
    spec = workers.spec(sweep)
    process = workers.start("w", "sweep", sweep.name, "--no-progress")
    try:
        victim = wait_until(
            lambda: (t := running_trial(spec)) is not None and len(t.intermediate_values) >= 2
            and t, timeout=60, what="a trial logging its epochs")
        services.stop_mlflow(servers.folder)  # mid-trial, and not back in time
        stopped = time.monotonic()
        try:
            code, err = workers.finish(process, timeout=store_timeout + 60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            code, err = workers.finish(process, timeout=30)
            pytest.fail(f"the worker did not stop within {store_timeout + 60} s:\n{err}")
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:  # the test failed before it stopped
            process.kill()
            process.communicate()
        services.start_mlflow(servers)  # the session's server, for the tests after this one
    assert code == 3, err
    assert took < store_timeout + 30, (took, err)
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: tracking store http://optimsweep:***@127.0.0.1"), err
    trial = load_study(spec).trials[victim.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"]
    assert "tracking store" in trial.user_attrs["error"]

    # The repairing sweep runs in this process: the dead worker is what it repairs after.
    code, err = workers.run_here(capfd, monkeypatch, "w", "sweep", sweep.name, "--no-progress")
    assert code == 0, err
    client, children, trials = assert_invariant(spec)
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 1 and all(t.state == TrialState.COMPLETE for t in counted)
    assert [t.number for t in trials if t.user_attrs.get("interrupted")] == [victim.number]
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optimsweep.state"] == "failed"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert len(mlflow_runs(spec, "study")[1]) == 1
    workers.assert_no_password(servers)


def test_a_password_given_as_a_query_parameter_is_never_stored_or_printed(
        servers, tmp_path, capfd, monkeypatch):
    """libpq's `?password=` form, written in the sweep file itself: the study works, its
    winner is registered through the tracking server and loads from it by alias, and the
    password is in no output, no database row and no artifact (the sweep file's copies and
    the model's files included)."""
    import mlflow
    import numpy as np

    workers = Workers(servers, tmp_path)
    del workers.env["OPTIMSWEEP_STORAGE"]  # the file's own storage: URL below
    storage = f"{servers.storage.split('?')[0]}?password={workers.password}"
    sweep = server_sweep(tmp_path / "w", "query", n_trials=2, epochs=2, storage=storage)
    code, err = workers.run("w", "--debug", "sweep", sweep.name, "--no-progress")
    assert code == 0, err
    spec = dataclasses.replace(load_spec(sweep), tracking_uri=workers.env["MLFLOW_TRACKING_URI"])
    client, children, trials = assert_invariant(spec)
    assert len(trials) == 2
    (parent,) = mlflow_runs(spec, "study")[1]
    assert parent.data.tags["optimsweep.storage"].endswith("?password=***")
    code, err = workers.run_here(capfd, monkeypatch, "w", "export", sweep.name)
    assert code == 0, err
    assert "registered as query version 1, now champion" in workers.outputs[-2]
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(
            workers.env["MLFLOW_TRACKING_URI"]):
        model = mlflow.pyfunc.load_model("models:/query@champion")
    assert model.predict(np.ones((3, 1), dtype=np.float32)).shape == (3, 1)
    workers.assert_no_password(servers)


def pause_outside_transactions(servers, process: subprocess.Popen) -> None:
    """SIGSTOP the worker at a moment none of its connections is inside a transaction (a row
    lock held by a stopped process would stall the worker that must fail its trial)."""
    import psycopg

    while True:
        process.send_signal(signal.SIGSTOP)
        with psycopg.connect(servers.database_url("postgres"), autocommit=True) as conn:
            busy = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'optuna' "
                                "AND application_name LIKE %s AND state <> 'idle'",
                                (f"% pid {process.pid}",)).fetchone()[0]
        if not busy:
            return
        process.send_signal(signal.SIGCONT)
        time.sleep(0.05)


def run_record(client, run_id: str) -> tuple:
    """Everything a write into a run would change: status, end time, tags, every metric's
    whole history."""
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value, m.timestamp) for m in
                     client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return run.info.status, run.info.end_time, dict(run.data.tags), run.data.params, history


def test_a_worker_paused_past_the_grace_period_wakes_and_writes_nothing_to_its_taken_trial(
        servers, tmp_path):
    """Worker A is SIGSTOPped mid-trial past the heartbeat's grace period; worker B fails
    A's trial, closes its run FAILED and retries its params. A, woken (SIGCONT), finds its
    trial no longer its own: not one more write into that trial, its run or the study's
    run; one `note:` line; it goes on (waits for the retry) and exits 0. The study's run
    ends FINISHED."""
    workers = Workers(servers, tmp_path)
    beat = {"interval": 1, "grace_period": 3}
    a = server_sweep(tmp_path / "a", "paused", n_trials=2, epochs=30, heartbeat=beat)
    b = server_sweep(tmp_path / "b", "paused", n_trials=2, epochs=30, heartbeat=beat)
    spec = workers.spec(a)
    client = MlflowClient(spec.tracking_uri)
    paused = workers.start("a", "sweep", a.name, "--no-progress")
    other = None
    try:
        victim = wait_until(lambda: (t := running_trial(spec)) is not None
                            and len(t.intermediate_values) >= 2 and t, timeout=90,
                            what="a trial of A training")
        pause_outside_transactions(servers, paused)
        stopped_at = int(time.time() * 1000)
        other = workers.start("b", "sweep", b.name, "--no-progress")
        run_id = victim.user_attrs["mlflow_run_id"]

        def taken_and_retried():
            trials = load_study(spec).trials
            return (trials[victim.number].state == TrialState.FAIL
                    and client.get_run(run_id).info.status == "FAILED"
                    and any(t.user_attrs.get("retry_of") == victim.number
                            and t.state == TrialState.RUNNING for t in trials))

        wait_until(taken_and_retried, timeout=60, what="B to fail A's trial and retry it")
        closed = run_record(client, run_id)
        assert "no heartbeat" in closed[2]["optimsweep.error"]
        paused.send_signal(signal.SIGCONT)
        code_a, err_a = workers.finish(paused)
        code_b, err_b = workers.finish(other)
    finally:
        for p in (paused, other):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.communicate()

    assert code_b == 0, err_b
    assert code_a == 0 and "Traceback" not in err_a and "error" not in err_a, err_a
    lines = [line for line in err_a.splitlines() if line.strip()]
    assert len(lines) == 1, err_a
    assert lines[0].startswith(
        f"note: trial {victim.number} was closed by another worker"), err_a
    # Not one write after it was closed. A request A had begun sending when it was stopped
    # reaches the server when it wakes: only curve points stamped before the stop may.
    after = run_record(client, run_id)
    assert after[:4] == closed[:4]
    in_flight = [point for key, points in after[4].items() for point in points
                 if point not in closed[4].get(key, [])]
    assert all(timestamp <= stopped_at for _, _, timestamp in in_flight), in_flight
    _, children, trials = assert_invariant(spec)
    (parent,) = mlflow_runs(spec, "study")[1]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 2
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["interrupted"]
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 2 and all(t.state == TrialState.COMPLETE for t in counted)
