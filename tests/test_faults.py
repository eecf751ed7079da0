"""Nothing lost: real processes receiving real signals, real races, torn and full files,
failures inside trials. Every case ends with the records invariant (tests/records.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from sqlalchemy import event

import optimsweep.core.train
import optimsweep.run.resume
from optimsweep.errors import StoreError
from optimsweep.records.storage import StudyStorage
from optimsweep.run.runner import run_sweep
from records import (
    DATA,
    assert_invariant,
    finish,
    load_study,
    mlflow_runs,
    run_cli,
    running_trial,
    running_trials,
    start,
    wait_until,
)
from sweeps import fashion_sweep, line_sweep, load

SLOW = {"n_trials": 2, "epochs": 30}  # about 1 s a trial: long enough to be hit mid-trial
FIXED_BATCH = {"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
               "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
               "batch_size": 16}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test in its own folder, as a user's project: exports/ lands there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIMSWEEP_DATA", str(DATA))


def slow_line(tmp_path: Path, **overrides) -> Path:
    return line_sweep(tmp_path, **{"budget": SLOW, "search_space": FIXED_BATCH, **overrides})


def journal_lines(tmp_path: Path) -> list[dict]:
    """Every line of the journal parses: nothing torn was appended to."""
    return [json.loads(line) for line in
            (tmp_path / "mlruns" / "optuna.journal").read_bytes().splitlines()]


def assert_whole_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def counted(trials) -> list:
    return [t for t in trials if not t.user_attrs.get("interrupted")]


# ---------------------------------------------------------------- races between processes

def test_two_sweeps_started_at_once_on_fresh_stores_share_one_study(tmp_path):
    """Both exit 0; exactly n_trials trials, distinct params, one parent run, 1:1."""
    path = line_sweep(tmp_path, budget={"n_trials": 6, "epochs": 20})
    processes = [start("sweep", path, "--no-progress", cwd=tmp_path) for _ in range(2)]
    results = [finish(p) for p in processes]
    assert [code for code, _, _ in results] == [0, 0], results
    _, children, trials = assert_invariant(load(path))
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no repeats
    assert_whole_sqlite(tmp_path / "mlruns" / "mlflow.db")


def test_two_sweeps_resuming_one_study_claim_the_budget_trial_by_trial(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 20})
    run_sweep(load(path), progress=False)
    other = start("sweep", path, "--n-trials", 8, "--no-progress", cwd=tmp_path)
    run_sweep(load(path), n_trials=8, progress=False)  # this process, at the same time
    assert finish(other)[0] == 0
    _, _, trials = assert_invariant(load(path), n_trials=8)
    assert len(trials) == 8
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8


# ---------------------------------------------------------------- signals

def test_ctrl_c_while_the_stores_are_being_created_leaves_them_usable(tmp_path):
    """The tracking database is created in a temporary file: a Ctrl-C halfway through its
    migration leaves no half-made mlflow.db, and the next command works."""
    path = line_sweep(tmp_path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    wait_until(lambda: list((tmp_path / "mlruns").glob(".mlflow.db.*.partial")),
               what="mlflow.db being created")
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == 130 and "Traceback" not in err
    assert not list((tmp_path / "mlruns").glob(".mlflow.db.*.partial*"))
    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():  # the signal came after the rename: then the database is whole
        assert_whole_sqlite(db)

    run_sweep(load(path), progress=False)
    assert len(counted(assert_invariant(load(path))[2])) == 4


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_trial_closes_it_uncounted_and_the_baseline_runs_again(
        tmp_path, signum, exit_code):
    """Trial 0 is the baseline. Interrupted mid-trial: it ends FAIL and `interrupted`, its
    run FAILED, the study's run KILLED; running again re-runs the baseline to completion
    and spends the whole budget."""
    baseline = {"optimizer": "sgd", "lr": 0.01}
    path = slow_line(tmp_path, baseline=[baseline])
    spec = load(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    wait_until(lambda: running_trial(spec), what="trial 0 running")
    process.send_signal(signum)
    code, _, err = finish(process)
    assert code == exit_code and "Traceback" not in err and "interrupted" in err
    (trial,) = load_study(spec).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"] is True
    assert mlflow_runs(spec, "study")[1][0].info.status == "KILLED"
    assert_invariant(spec)

    run_sweep(load(path), progress=False)
    _, _, trials = assert_invariant(spec)
    assert len(counted(trials)) == 2 and trials[1].params == baseline
    assert trials[1].state.name == "COMPLETE" and trials[1].user_attrs["baseline"] is True


def test_sigkill_mid_trial_is_repaired_by_the_next_command(tmp_path, capsys):
    """SIGKILL gives no chance to clean up: the next command (here `export`, then `sweep`,
    both run in this process, which is not the dead one) fails the dead process's trial and
    its run, closes the study's run, and the budget still ends exact."""
    path = slow_line(tmp_path)
    spec = load(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    wait_until(lambda: (t := running_trial(spec)) and t.number == 1, timeout=90,
               what="trial 1 running")
    process.kill()
    process.communicate()
    assert running_trial(spec) is not None  # nobody has repaired anything yet

    code, out, err = run_cli(capsys, "export", path, "--out", tmp_path / "best")
    assert code == 0, err
    assert "trial 1: its process had ended" in err
    _, _, trials = assert_invariant(spec)
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["interrupted"] is True
    assert mlflow_runs(spec, "study")[1][0].info.status == "KILLED"

    run_sweep(load(path), progress=False)
    _, _, trials = assert_invariant(spec)
    assert len(counted(trials)) == 2 and len(trials) == 3


def test_a_killed_worker_is_replaced_by_the_others_and_the_budget_ends_exact(tmp_path, capsys):
    """The worker is what dies, a real process killed by a real SIGKILL; the parent that
    sees it die and has the others finish runs in this process (saving one process start)."""
    path = slow_line(tmp_path, budget={"n_trials": 3, "epochs": 30})
    spec = load(path)
    killed: list = []

    def kill_a_worker_mid_trial():
        try:
            victim = wait_until(lambda: running_trial(spec), timeout=90,
                                what="a worker's trial")
            os.kill(victim.user_attrs["pid"], signal.SIGKILL)
            killed.append(victim)
        except BaseException as exc:  # noqa: BLE001  (reported below, in the test's thread)
            killed.append(exc)

    killer = threading.Thread(target=kill_a_worker_mid_trial)
    killer.start()
    code, out, err = run_cli(capsys, "sweep", path, "--workers", 2, "--no-progress")
    killer.join()
    (victim,) = killed
    assert not isinstance(victim, BaseException), victim
    assert code == 0, err
    assert f"pid {victim.user_attrs['pid']}) was killed by SIGKILL" in err
    assert "Traceback" not in err
    _, children, trials = assert_invariant(spec)
    dead = trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["interrupted"] is True
    assert len(counted(trials)) == 3 and all(t.state.name == "COMPLETE" for t in counted(trials))
    assert "budget 3 of 3 used" in out


# ---------------------------------------------------------------- torn and full files

def test_a_torn_last_journal_line_is_set_aside_never_appended_to(tmp_path, capsys):
    """A crash cut the journal's last write short: `best` says so and drops nothing
    silently; the next sweep repairs it and carries on; every line stays whole."""
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    spec = load(path)
    run_sweep(spec, progress=False)
    journal = tmp_path / "mlruns" / "optuna.journal"
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last + (len(data) - last) // 2])  # half the last record

    code, out, err = run_cli(capsys, "best", path)
    assert code == 0 and "cut short by an earlier crash" in err
    assert list((tmp_path / "mlruns").glob("optuna.journal.torn-*"))

    run_sweep(load(path), n_trials=3, progress=False)
    journal_lines(tmp_path)
    _, _, trials = assert_invariant(spec, n_trials=3)
    assert len(counted(trials)) == 3


def test_a_torn_line_in_the_middle_is_refused_with_its_line_number(tmp_path, capsys):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    run_sweep(load(path), progress=False)
    journal = tmp_path / "mlruns" / "optuna.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:10] + b"\n"
    journal.write_bytes(b"".join(lines))
    code, _, err = run_cli(capsys, "sweep", path)
    assert code == 3 and "line 3 is not a whole journal record" in err
    assert err.count("\n") == 1 and journal.read_bytes() == b"".join(lines)


def test_a_process_that_opened_the_journal_before_a_crash_never_appends_to_a_torn_line(
        tmp_path):
    """Another process dies mid-write while this one has the journal open: this one's next
    write sets the torn bytes aside first, so its record is whole and readable."""
    from optimsweep.records.storage import open_storage

    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    run_sweep(load(path), progress=False)
    journal = tmp_path / "mlruns" / "optuna.journal"
    study = optuna.load_study(study_name="line", storage=open_storage(str(journal)))
    with open(journal, "ab") as fh:
        fh.write(b'{"op_code": 8, "worker_id": "dead", "trial_id": 0, "user_a')
    study.set_user_attr("written_after_the_crash", True)
    journal_lines(tmp_path)
    again = optuna.load_study(study_name="line", storage=open_storage(str(journal)))
    assert again.user_attrs["written_after_the_crash"] is True


def test_a_trial_asked_by_a_process_that_died_at_once_gets_a_run_and_fails(tmp_path):
    """A process died between asking Optuna for a trial and recording who runs it: the
    next sweep fails that trial (uncounted) with a FAILED run of its own."""
    from optimsweep.records.storage import open_storage

    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 1})
    run_sweep(load(path), n_trials=1, progress=False)
    storage = open_storage(str(tmp_path / "mlruns" / "optuna.journal"))
    optuna.load_study(study_name="line", storage=storage).ask()  # and then nothing
    run_sweep(load(path), progress=False)
    _, _, trials = assert_invariant(load(path))
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["interrupted"] is True
    assert len(counted(trials)) == 2


def test_a_grid_covers_every_point_once_even_after_an_interrupted_trial(tmp_path,
                                                                         monkeypatch):
    """The baseline is one of the points, the interrupted point is run again, and the grid
    ends when every point has its verdict, before the budget of 6."""
    real_fit = optimsweep.core.train.fit_group
    calls = iter(range(100))

    def fit_interrupted_once(configs, data, on_epoch=None, **checkpoints):
        if next(calls) == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises inside fit
        return real_fit(configs, data, on_epoch, **checkpoints)

    monkeypatch.setattr(optimsweep.core.train, "fit_group", fit_interrupted_once)
    path = line_sweep(tmp_path, budget={"n_trials": 6, "epochs": 1}, sampler={"name": "grid"},
                      baseline=[{"optimizer": "adam", "batch_size": 64}],
                      search_space={"optimizer": {"type": "categorical",
                                                  "choices": ["sgd", "adam"]},
                                    "batch_size": {"type": "categorical", "choices": [16, 64]},
                                    "lr": 0.01})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load(path), progress=False)
    run_sweep(load(path), progress=False)
    _, _, trials = assert_invariant(load(path))
    points = sorted((t.params["optimizer"], t.params["batch_size"]) for t in counted(trials))
    assert points == [("adam", 16), ("adam", 64), ("sgd", 16), ("sgd", 64)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB file system (tmpfs) when running as root; else skipped locally (CI runs
    as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    if not mounted:
        if os.environ.get("CI"):
            pytest.fail("CI must run the disk-full test: it needs root to mount a tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_sweep_and_leaves_no_run_running(small_disk, tmp_path):
    """On a 6 MiB disk the second state_dict (2.7 MB) does not fit: the sweep stops with one
    line, that trial is failed and uncounted, its run FAILED, and no file is left half
    written. Given more space, the same command finishes the study."""
    path = fashion_sweep(small_disk, budget={"n_trials": 3, "epochs": 1},
                         data={"train_subset": 256, "val_size": 256})
    spec = load(path)
    with pytest.raises(StoreError, match="No space left on device"):
        run_sweep(spec, progress=False)
    _, _, trials = assert_invariant(spec)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["interrupted"] is True
    assert "No space left" in trials[1].user_attrs["error"]
    assert not [p for p in small_disk.rglob("*") if ".partial" in p.name or "tmp" in p.name]
    journal_lines(small_disk)
    assert_whole_sqlite(small_disk / "mlruns" / "mlflow.db")

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    study = run_sweep(load(path), progress=False)
    assert len(counted(study.trials)) == 3
    assert_invariant(spec)


# ---------------------------------------------------------------- failures inside trials

def test_any_failure_inside_a_trial_fails_that_trial_and_the_study_goes_on(tmp_path,
                                                                           monkeypatch):
    """Out of memory and a bad config inside trials 1 and 2 (raised where `fit` would): each
    fails with its reason and traceback on its run; trial 3 runs; the parent run gets its
    counts and plots."""
    real_fit = optimsweep.core.train.fit_group
    failures = iter([None, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                     optimsweep.core.train.ConfigError("device: 'cuda' was asked for"), None])

    def fit_or_fail(configs, data, on_epoch=None, **checkpoints):
        failure = next(failures)
        if failure is not None:
            raise failure
        return real_fit(configs, data, on_epoch, **checkpoints)

    monkeypatch.setattr(optimsweep.core.train, "fit_group", fit_or_fail)
    spec = load(line_sweep(tmp_path, budget={"n_trials": 4, "epochs": 2}))
    study = run_sweep(spec, progress=False)
    client, children, trials = assert_invariant(spec)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert "OutOfMemoryError" in trials[1].user_attrs["error"]
    assert "device: 'cuda'" in trials[2].user_attrs["error"]
    run_id = trials[1].user_attrs["mlflow_run_id"]
    assert "OutOfMemoryError" in client.get_run(run_id).data.tags["optimsweep.error"]
    text = Path(client.download_artifacts(run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "fit_or_fail" in text
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_fail"] == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}


def test_a_database_connection_lost_as_a_trial_starts_is_retried_not_its_failure(
        tmp_path, monkeypatch):
    """A restart of PostgreSQL just as a trial reads which trials it retries (seen, rarely,
    in the server tests' restart): the lost connection is tried again, as every study read
    is, and the trial completes instead of failing with the store's error as its own. The
    failure is Optuna's, as a real restart raises it; raised here at that moment, which a
    real restart hits only by chance."""
    import sqlalchemy

    real = optimsweep.run.resume.retried_runs
    lost = iter([True])

    def connection_lost_once(study, trial):
        if next(lost, False):
            try:
                raise sqlalchemy.exc.OperationalError(
                    "SELECT", {}, ConnectionError("server closed the connection unexpectedly"))
            except sqlalchemy.exc.OperationalError as exc:
                raise optuna.exceptions.StorageInternalError(
                    "An exception is raised during the commit.") from exc
        return real(study, trial)

    monkeypatch.setattr(optimsweep.run.resume, "retried_runs", connection_lost_once)
    spec = load(line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2}))
    run_sweep(spec, progress=False)
    _, _, trials = assert_invariant(spec)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [
        t.user_attrs.get("error") for t in trials]


def test_a_tracking_store_that_cant_be_written_stops_the_sweep_with_one_line(tmp_path, capsys,
                                                                             monkeypatch):
    """Mid-trial, the artifact folder is replaced by a file (a real OSError inside MLflow's
    store): the trial is failed without using budget, its run closed, the sweep stops with
    one line; once the store is fixed the same command finishes."""
    # No process fails here, the store does: the sweep runs in this process, and the folder
    # is replaced as trial 0 starts training (its run already made), as it was mid-trial in
    # a separate process. Three epochs a trial: nothing has to be hit mid-trial from outside.
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 3}, search_space=FIXED_BATCH)
    spec = load(path)
    artifacts = tmp_path / "mlruns" / "artifacts"
    real_fit = optimsweep.core.train.fit_group
    calls = iter(range(100))

    def fit_with_the_store_broken_once(configs, data, on_epoch=None, **checkpoints):
        if next(calls) == 0:
            assert running_trial(spec) is not None
            artifacts.rename(tmp_path / "moved")
            artifacts.write_text("not a folder")
        return real_fit(configs, data, on_epoch, **checkpoints)

    monkeypatch.setattr(optimsweep.core.train, "fit_group", fit_with_the_store_broken_once)
    code, _, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 3 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: tracking store sqlite:///")
    _, _, trials = assert_invariant(spec)
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["interrupted"] is True

    artifacts.unlink()
    (tmp_path / "moved").rename(artifacts)
    run_sweep(load(path), progress=False)
    assert len(counted(assert_invariant(spec)[2])) == 2


# ---------------------------------------------------------------- lost and edited records

def test_a_deleted_tracking_database_is_refused_not_silently_replaced(tmp_path, capsys):
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    run_sweep(load(path), progress=False)
    db, journal = tmp_path / "mlruns" / "mlflow.db", tmp_path / "mlruns" / "optuna.journal"
    db.unlink()
    before = journal.read_bytes()
    for command in (["sweep", path, "--n-trials", 3], ["export", path]):
        code, _, err = run_cli(capsys, *command)
        assert code == 3 and "has no record of study 'line'" in err and "Traceback" not in err
    assert not db.exists() and journal.read_bytes() == before
    assert not (tmp_path / "exports").exists()


def test_a_read_only_tracking_database_is_named_as_such_in_one_line(tmp_path):
    """A real read-only file (immutable, so that root can't write it either): one line that
    says so, exit 3, nothing of the study changed; writable again, the sweep goes on."""
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    run_sweep(load(path), progress=False)
    db, journal = tmp_path / "mlruns" / "mlflow.db", tmp_path / "mlruns" / "optuna.journal"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the read-only test: `chattr +i` needs root")
        pytest.skip("`chattr +i` needs root and a file system that has it")
    try:
        before = (db.read_bytes(), len(load_study(load(path)).trials))
        code, _, err = finish(start("sweep", path, "--n-trials", 3, cwd=tmp_path))
        after = (db.read_bytes(), len(load_study(load(path)).trials))
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    assert f"{db} is read-only" in err and "autoflush" not in err
    assert after == before and journal.exists()
    code, _, err = finish(start("sweep", path, "--n-trials", 3, cwd=tmp_path))
    assert code == 0, err
    assert_invariant(load(path), 3)


def all_runs(spec) -> dict[str, tuple[str, str]]:
    """Every run of the study's experiment, deleted ones too: id -> (lifecycle, status)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    return {r.info.run_id: (r.info.lifecycle_stage, r.info.status) for r in client.search_runs(
        [experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000)}


@pytest.mark.parametrize("other_name", ["other", "line"])
def test_a_journal_copied_over_between_an_appends_check_and_its_write_gets_nothing(
        tmp_path, other_name):
    """`cp` takes no lock: another study's journal copied over this one just after an
    append checked the file (the window the mid-sweep test hit about once in 20 runs). The
    append's line is cut off the other journal again and the writer told; the other
    journal is left as it was copied, whole."""
    other = tmp_path / "other.journal"
    optuna.create_study(study_name=other_name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(other))))
    copied = other.read_bytes()
    journal = tmp_path / "optuna.journal"
    store = StudyStorage(str(journal))
    optuna.create_study(study_name="line", storage=store.optuna)
    checked = store.journal.check

    def check_then_copied_over():
        checked()
        shutil.copyfile(other, journal)  # in place, as cp does

    store.journal.check = check_then_copied_over
    with pytest.raises(StoreError, match="journal was rewritten"):
        optuna.create_study(study_name="second", storage=store.optuna)
    assert journal.read_bytes() == copied
    with pytest.raises(StoreError, match="journal was rewritten"):  # and it stays stopped
        store.journal.check()


@pytest.mark.parametrize("how, other_name", [("deleted", None), ("replaced", "other"),
                                             ("replaced", "line")],
                         ids=["deleted", "replaced-by-another-study",
                              "replaced-by-a-same-named-study"])
def test_a_journal_deleted_or_replaced_mid_sweep_stops_it_and_the_next_sweep_refuses(
        tmp_path, how, other_name):
    """The journal deleted, or another study's journal copied over it (in place: the same
    inode), while a real sweep trains: the sweep stops with one line naming the file, its
    trial's run FAILED, the study's run FAILED, nothing RUNNING, nothing deleted, nothing
    written into the other study's journal. The next sweep refuses with one line and
    changes nothing; with the journal restored (deleted case) it finishes the study."""
    path = slow_line(tmp_path, budget={"n_trials": 3, "epochs": 30})
    spec = load(path)
    run_sweep(spec, n_trials=1, progress=False)  # a finished trial, its weights to keep
    journal = tmp_path / "mlruns" / "optuna.journal"
    if other_name is not None:
        (tmp_path / "other").mkdir()  # the same-named one from the same sweep file
        other_path = (slow_line(tmp_path / "other", budget={"n_trials": 3, "epochs": 30})
                      if other_name == "line" else line_sweep(tmp_path / "other", other_name))
        run_sweep(load(other_path), n_trials=1, progress=False)
        other = (tmp_path / "other" / "mlruns" / "optuna.journal").read_bytes()
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    victim = wait_until(lambda: (t := running_trial(spec)) and t.number == 1
                        and len(t.intermediate_values) >= 2 and t, timeout=90,
                        what="trial 1 training")
    backup = journal.read_bytes()
    if how == "deleted":
        journal.unlink()
    else:
        (tmp_path / "other.journal").write_bytes(other)
        shutil.copyfile(tmp_path / "other.journal", journal)  # cp: rewritten in place
    code, out, err = finish(process)

    assert code == 3 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.strip()]
    word = "deleted" if how == "deleted" else "rewritten"
    assert line.startswith(f"error: {journal}: the study's journal was {word}"), err
    runs = all_runs(spec)
    assert {stage for stage, _ in runs.values()} == {"active"}  # nothing deleted
    assert "RUNNING" not in {status for _, status in runs.values()}
    client, children = mlflow_runs(spec, "trial")
    by_trial = {r.data.tags["optimsweep.trial_number"]: r for r in children}
    assert by_trial["0"].info.status == "FINISHED"
    assert "state_dict.pt" in [a.path for a in client.list_artifacts(by_trial["0"].info.run_id)]
    assert by_trial["1"].info.run_id == victim.user_attrs["mlflow_run_id"]
    assert by_trial["1"].info.status == "FAILED"
    assert "journal was" in by_trial["1"].data.tags["optimsweep.error"]
    assert set(by_trial) == {"0", "1"}  # no trial claimed from the lost journal
    (parent,) = mlflow_runs(spec, "study")[1]
    assert parent.info.status == "FAILED"
    if how == "deleted":
        assert not journal.exists()  # not created anew
    else:
        assert journal.read_bytes() == other  # nothing appended to the other study's journal

    code, out, err = finish(start("sweep", path, "--no-progress", cwd=tmp_path))
    assert code == 3 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert "restore" in line.lower() and "new name" in line, line
    assert all_runs(spec) == runs
    if how == "deleted":
        assert not journal.exists()
        assert "no study 'line'" in line and "lost them" in line
    else:
        assert journal.read_bytes() == other
        assert [s.study_name for s in optuna.get_all_study_summaries(
            optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                str(journal))))] == [other_name]
        return

    journal.write_bytes(backup)  # restored: the study resumes and its records agree again
    run_sweep(load(path), progress=False)
    _, children, trials = assert_invariant(spec)
    assert len(counted(trials)) == 3 and trials[1].user_attrs["interrupted"] is True
    assert {r.info.run_id for r in children} >= {rid for rid, (stage, _) in runs.items()
                                                 if rid != parent.info.run_id}


def test_a_state_dict_replaced_by_a_malicious_pickle_is_never_executed(tmp_path, capsys):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    study = run_sweep(load(path), progress=False)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    (artifact,) = (tmp_path / "mlruns" / "artifacts").rglob(f"{run_id}/**/state_dict.pt")
    torch.save({"weights": Payload()}, artifact)
    code, _, err = run_cli(capsys, "export", path, "--out", tmp_path / "best")
    assert code == 3 and "not a plain state_dict" in err
    assert not marker.exists() and not (tmp_path / "best").exists()


def test_an_export_that_fails_leaves_the_previous_export_whole(tmp_path, capsys):
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    study = run_sweep(load(path), progress=False)
    out = tmp_path / "exports" / "line"
    assert run_cli(capsys, "export", path)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    best = study.best_trial.user_attrs["mlflow_run_id"]
    (artifact,) = (tmp_path / "mlruns" / "artifacts").rglob(f"{best}/**/state_dict.pt")
    artifact.unlink()
    code, _, err = run_cli(capsys, "export", path)
    assert code == 3 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["line"]  # no temporary folders


def test_export_refuses_a_sweep_file_edited_since_the_study_began(tmp_path, capsys):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1})
    run_sweep(load(path), progress=False)
    line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 1},
               search_space={"lr": {"type": "float", "low": 0.1, "high": 0.5}})
    code, _, err = run_cli(capsys, "export", path)
    assert code == 2 and "already exists with a different" in err
    assert not (tmp_path / "exports").exists()


def test_export_drops_a_confirmation_that_a_better_trial_has_made_stale(tmp_path):
    from optimsweep.confirm import confirm
    from optimsweep.export import export_best
    from optimsweep.run.study import open_existing

    bad, worse, good = ({"optimizer": "sgd", "lr": lr, "batch_size": 64}
                        for lr in (0.002, 0.001, 0.1))
    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2},
                      baseline=[bad, worse, good])
    run_sweep(load(path), progress=False)
    confirm(open_existing(path), top_k=2, seeds=1, log=lambda _: None)
    run_sweep(load(path), n_trials=3, progress=False)  # the good baseline completes now
    done = export_best(open_existing(path), tmp_path / "best")
    assert done.trial.number == 2 and "confirmation is stale" in done.reason


def test_confirm_fails_one_seeds_run_and_goes_on(tmp_path, monkeypatch):
    from optimsweep.confirm import confirm
    from optimsweep.run.study import open_existing

    path = line_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2})
    run_sweep(load(path), progress=False)
    real_fit = optimsweep.core.train.fit
    calls = iter(range(100))

    def fit_failing_once(config, data, on_epoch=None, **checkpoints):
        if next(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_fit(config, data, on_epoch, **checkpoints)

    monkeypatch.setattr(optimsweep.core.train, "fit", fit_failing_once)
    results = confirm(open_existing(path), top_k=2, seeds=2, log=lambda _: None)
    values = [v for c in results for v in c.values]
    assert sum(v != v for v in values) == 1  # exactly one nan
    runs = mlflow_runs(load(path), "confirm")[1]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED",
                                                   "FINISHED"]
    assert_invariant(load(path))


@pytest.fixture
def ctrl_c_as_the_cli_handles_it():
    """This process's SIGINT and SIGTERM handled as `optimsweep` handles them."""
    from optimsweep.util.signals import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    stop_on_signals()
    yield
    stop_on_signals()  # forgets the signal the test sent, which check() would raise again
    for signum, handler in before.items():
        signal.signal(signum, handler)
    sys.unraisablehook = hook


@pytest.mark.parametrize("moment", ["creating the run", "logging an epoch"])
def test_a_ctrl_c_before_a_tracking_write_commits_is_raised_after_it(
        tmp_path, ctrl_c_as_the_cli_handles_it, moment):
    """A real SIGINT that arrives while MLflow's SQLite store is being written, before the
    write commits (sent from SQLAlchemy's before-commit hook), is raised once the write is
    done, and the trial's run is closed at once. Raised inside the write, it left a pooled
    connection holding the database's write lock: closing the run waited 20 s for it,
    failed, and left the run RUNNING. Raised just after the run was created, before its
    owner had it, it left the run RUNNING too."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from optimsweep.core.train import EpochStats
    from optimsweep.records.tracking import Tracker
    from optimsweep.run.life import owned_run
    from optimsweep.util.signals import Interrupted

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment_id("writes")
    engine = SqlAlchemyStore._engine_map[tracker.uri]
    sent = []

    def ctrl_c_before_commit(conn):
        if not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    if moment == "creating the run":
        event.listen(engine, "commit", ctrl_c_before_commit)
    with pytest.raises(Interrupted):
        with owned_run(tracker, lambda: tracker.start_run(experiment, None, "writes", 0)
                       ) as outcome:
            event.listen(engine, "commit", ctrl_c_before_commit)
            tracker.log_epoch(outcome.run_id, EpochStats(epoch=1, train_loss=0.9, val_loss=0.8,
                                                         val_accuracy=0.5, lr=0.1, seconds=1))
    event.remove(engine, "commit", ctrl_c_before_commit)
    (run,) = tracker.runs(experiment, "trial")
    assert sent and run.info.status == "FAILED"
    assert run.data.tags["optimsweep.error"].startswith("interrupted")
    if moment == "logging an epoch":
        assert run.data.metrics["val_loss"] == 0.8  # the write it came in is whole


def test_ctrl_c_during_confirm_closes_its_run(tmp_path):
    path = slow_line(tmp_path, budget={"n_trials": 1, "epochs": 50})
    spec = load(path)
    run_sweep(spec, progress=False)
    process = start("confirm", path, "--top-k", 1, "--seeds", 2, cwd=tmp_path)
    wait_until(lambda: mlflow_runs(spec, "confirm")[1], what="a confirm run")
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == 130 and "Traceback" not in err
    (run,) = mlflow_runs(spec, "confirm")[1]
    assert run.info.status == "FAILED"
    assert run.data.tags["optimsweep.error"].startswith("interrupted")
    assert_invariant(spec)


def test_confirm_killed_then_run_again_reuses_the_seeds_that_finished(tmp_path, capsys):
    """SIGKILL after the first seed's re-training finished, mid-second: the next confirm
    trains only the seeds that did not finish, and each seed ends with one FINISHED run."""
    path = slow_line(tmp_path, budget={"n_trials": 1, "epochs": 30})
    spec = load(path)
    run_sweep(spec, progress=False)
    process = start("confirm", path, "--top-k", 1, "--seeds", 3, cwd=tmp_path)
    first = wait_until(lambda: [r for r in mlflow_runs(spec, "confirm")[1]
                                if r.info.status == "FINISHED"], timeout=90,
                       what="a finished confirm run")[0]
    wait_until(lambda: len(mlflow_runs(spec, "confirm")[1]) == 2, what="the second seed")
    process.kill()
    finish(process)
    code, out, err = run_cli(capsys, "confirm", path, "--top-k", 1, "--seeds", 3)
    assert code == 0, err
    assert f"seed {first.data.tags['optimsweep.seed']}: val_loss" in out and \
        f"(run {first.info.run_id}, finished earlier)" in out
    runs = mlflow_runs(spec, "confirm")[1]
    finished = sorted(r.data.tags["optimsweep.seed"] for r in runs
                      if r.info.status == "FINISHED")
    assert finished == ["1", "2", "3"]
    assert [r.info.status for r in runs].count("FAILED") == 1  # the killed one, repaired
    assert_invariant(spec)


WORKER_SIGNALS = """
import os, signal
from optimsweep.util import signals
signals.stop_on_signals(once=True)  # as a worker does
both = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C reaches the whole process group...
os.kill(os.getpid(), signal.SIGTERM)  # ...and the parent passes SIGTERM on at once
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
    sum(range(1000))
except signals.Interrupted as exc:
    print("stopped by", exc.signum)
sum(range(1000))  # closing its trial: the second signal must not cut in
print("closed")
"""


def test_a_worker_hit_by_ctrl_c_and_its_parents_sigterm_at_once_stops_quietly():
    """Both signals pending together in a real process: the first stops it, the second is
    ignored without Python's "Signal 15 ignored due to race condition" traceback (which
    `--workers 3` and Ctrl-C printed once per worker)."""
    done = subprocess.run([sys.executable, "-c", WORKER_SIGNALS], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["stopped", "by", "2", "closed"]
    assert done.returncode == 0 and done.stderr == ""


def test_sigterm_to_a_sweep_with_workers_closes_every_workers_trial(tmp_path):
    """SIGTERM reaches only the parent: it passes it on, each worker closes its own trial,
    and nothing is left RUNNING."""
    path = slow_line(tmp_path, budget={"n_trials": 4, "epochs": 30})
    spec = load(path)
    process = start("sweep", path, "--workers", 2, "--no-progress", cwd=tmp_path)
    wait_until(lambda: len(running_trials(spec)) == 2, timeout=90,
               what="both workers in a trial")
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 143 and "Traceback" not in err
    _, _, trials = assert_invariant(spec)
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 2 and len({t.user_attrs["pid"] for t in interrupted}) == 2
    assert mlflow_runs(spec, "study")[1][0].info.status == "KILLED"


def test_sigterm_to_a_sweeps_whole_process_group_is_waited_out_by_its_parent(tmp_path):
    """systemd, Slurm and `timeout` signal a sweep's whole process group: the workers close
    their trials while the parent waits for them (the fork server they came from outlives
    the signal, to pass their exit codes on), and none is left behind when it exits."""
    # trials far longer than the test: under load, both workers are surely mid-training
    path = slow_line(tmp_path, budget={"n_trials": 4, "epochs": 1000})
    spec = load(path)
    process = start("sweep", path, "--workers", 2, "--no-progress", cwd=tmp_path,
                    new_session=True)  # a group of its own, as a service's
    try:
        wait_until(lambda: len([t for t in running_trials(spec) if t.intermediate_values])
                   == 2, timeout=90, what="both workers training a trial")
        os.killpg(process.pid, signal.SIGTERM)
        code, _, err = finish(process)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the fork server holds SIGTERM
            os.killpg(process.pid, signal.SIGKILL)
    # one line: the workers closed their own trials, none was left to the parent
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert code == 143 and line.startswith("interrupted: "), err
    _, _, trials = assert_invariant(spec)
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len({t.user_attrs["pid"] for t in interrupted}) == 2
    (study_run,) = mlflow_runs(spec, "study")[1]
    assert study_run.info.status == "KILLED"
    # closed once its workers had closed their trials: the parent waited for them
    assert all(study_run.info.end_time >= t.datetime_complete.timestamp() * 1000
               for t in interrupted)


def test_a_damaged_mlflow_schema_template_is_replaced_not_copied(tmp_path, monkeypatch):
    """New tracking stores are copies of one migrated empty database per machine; a torn
    template is dropped, the store is migrated in place, and the next store gets a whole
    template again."""
    from optimsweep.records.tracking import Tracker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert first.experiment_id("one")
    template = next((tmp_path / "cache" / "optimsweep").glob("mlflow-*-schema.db"))
    whole = template.read_bytes()
    template.write_bytes(whole[: len(whole) // 3])  # torn, as by a full disk
    second = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert second.experiment_id("two") and not template.exists()
    Tracker(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}").experiment_id("three")
    assert template.read_bytes()[:16] == b"SQLite format 3\x00"


def test_a_curve_point_is_dated_by_the_check_that_the_trial_was_still_ours(tmp_path,
                                                                           monkeypatch):
    """A worker stopped (SIGSTOP, a paused VM) right after checking that its trial is still
    its own sends that epoch's points when it wakes, maybe after another worker took the
    trial: they are dated by the check, never later, so the records tell them from a write
    made after the trial was taken (test_servers stops a real worker; this is the window)."""
    from optimsweep.records.storage import StudyStorage
    from optimsweep.records.tracking import Tracker

    checks, writes = [], {}
    still_running, log_epoch, log_result = (StudyStorage.still_running, Tracker.log_epoch,
                                            Tracker.log_result)

    def checked_then_stopped(self, trial_id):
        mine = still_running(self, trial_id)
        checks.append(time.time())
        time.sleep(0.05)
        return mine

    def logged(self, run_id, stats, *args, **kwargs):
        writes[stats.epoch] = checks[-1]  # the check the write relies on
        return log_epoch(self, run_id, stats, *args, **kwargs)

    def result_logged(self, run_id, result, *args, **kwargs):
        writes["test"] = checks[-1]
        return log_result(self, run_id, result, *args, **kwargs)

    monkeypatch.setattr(StudyStorage, "still_running", checked_then_stopped)
    monkeypatch.setattr(Tracker, "log_epoch", logged)
    monkeypatch.setattr(Tracker, "log_result", result_logged)
    spec = load(line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 3}))
    run_sweep(spec, progress=False)
    client, (run,) = mlflow_runs(spec, "trial")
    points = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(p.step for p in points) == [1, 2, 3]
    assert all(p.timestamp <= writes[p.step] * 1000 for p in points), (points, writes)
    (test_loss,) = client.get_metric_history(run.info.run_id, "test_loss")
    assert test_loss.timestamp <= writes["test"] * 1000
