"""The records invariant, asserted through Optuna's and MLflow's own APIs, and real
`optimsweep` processes to break it with."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import forkserver
from pathlib import Path
from unittest import mock

import optuna
import pytest
from mlflow import MlflowClient

from optimsweep.records.schema import State
from optimsweep.records.storage import open_storage

TEST_IMAGES = 2_000


def _with_fewer_test_images(real: Path, n: int) -> Path:
    """A data folder holding `real`'s FashionMNIST training files and only the first `n` of
    its 10k test images, made once per machine. Every trial, and every pause of one,
    evaluates the whole test split: 10k images cost about what an epoch of the tests'
    trials costs (1k training images, 1k validated)."""
    import hashlib

    from optimsweep.core.data import FASHION_FILES, prepare_fashion_mnist

    raw = prepare_fashion_mnist(real, log=lambda _: None)
    key = hashlib.sha256(str(raw).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"optimsweep-tests-data-{n}-{key}"
    if (folder / "FashionMNIST" / "raw").is_dir():
        return folder
    making = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    (making / "FashionMNIST" / "raw").mkdir(parents=True)
    for name in FASHION_FILES:
        kept = making / "FashionMNIST" / "raw" / name
        if not name.startswith("t10k"):
            kept.symlink_to(raw / name)
            continue
        # IDX: a magic number whose last byte counts the dimensions, each dimension's size
        # (big-endian, the count of items first), then one byte per pixel or label
        data = (raw / name).read_bytes()
        sizes = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
        start = 4 + 4 * len(sizes)
        item = math.prod(sizes[1:])
        header = data[:4] + n.to_bytes(4, "big") + data[8:start]
        kept.write_bytes(header + data[start:start + n * item])
    try:
        making.rename(folder)
    except OSError:  # another test process made it first
        shutil.rmtree(making, ignore_errors=True)
    return folder


# The FashionMNIST that the tests' sweeps and commands train on (OPTIMSWEEP_DATA): all of
# the training images, the first TEST_IMAGES test images.
DATA = _with_fewer_test_images(
    Path(os.environ.get("OPTIMSWEEP_DATA", Path(__file__).parents[1] / "data")).resolve(),
    TEST_IMAGES)


def mlflow_runs(spec, role=None):
    if spec.tracking_uri.startswith("sqlite:///"):
        # A client on a missing file creates and migrates it: a test polling for runs would
        # race the process under test that is creating the same store.
        if not Path(spec.tracking_uri.removeprefix("sqlite:///")).exists():
            raise FileNotFoundError(f"no tracking store yet at {spec.tracking_uri}")
    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, [r for r in runs if role is None or r.data.tags["optimsweep.role"] == role]


def load_study(spec):
    return optuna.load_study(study_name=spec.name, storage=open_storage(spec.storage))


def assert_invariant(spec, n_trials: int | None = None):
    """Every trial has exactly one child run in the matching state, with its params; nothing
    is RUNNING; one parent run, FINISHED once the budget is used up; the counted trials
    never exceed the budget. A paused trial (pruner asha) waits SCHEDULED, only while the
    study's budget is not used up."""
    client, children = mlflow_runs(spec, "trial")
    (parent,) = mlflow_runs(spec, "study")[1]
    trials = load_study(spec).trials
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(
        r.info.run_id for r in children)
    by_id = {r.info.run_id: r for r in children}
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    budget = n_trials or spec.budget.n_trials
    for trial in trials:
        paused = trial.state.name == "WAITING" and trial.user_attrs.get("paused_at")
        assert trial.state.is_finished() or (paused and len(counted) < spec.budget.n_trials), \
            f"trial {trial.number} is {trial.state.name}"
        state = State.of_trial(trial)
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optimsweep.trial_number"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (run.info.status, run.data.tags["optimsweep.state"]) == (state.run_status,
                                                                        state.word)
        for name, value in trial.params.items():
            assert run.data.params[name] == str(value)
        best = f"best_{spec.metric}"  # runs of earlier versions have none
        if trial.state.name == "COMPLETE" or best in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, spec.metric)
            if trial.state.name == "COMPLETE":
                assert history[-1].value == pytest.approx(trial.value)
                # what MLflow sorts on, the latest value, is the study's value
                assert run.data.metrics[spec.metric] == pytest.approx(trial.value)
            if best in run.data.metrics:  # the best report so far, however often it resumed
                curve = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
                assert (run.data.metrics[best], run.data.metrics["best_epoch"]) == \
                    best_report(curve, spec.maximize), f"trial {trial.number}"
    assert parent.info.status != "RUNNING"
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(spec, "confirm")[1])
    assert len(counted) <= budget
    paused = [t for t in trials if t.state.name == "WAITING"]
    if len(counted) == budget and not paused:  # the budget used up: the study is done,
        assert parent.info.status == "FINISHED", parent.data.tags.get("optimsweep.note")
    if paused:  # trials paused at a rung may go on: the study run says how to
        assert parent.info.status == "KILLED"
        assert "run the sweep again" in parent.data.tags["optimsweep.note"]
    return client, children, trials


def best_report(curve: dict[int, float], maximize: bool) -> tuple[float, int]:
    """A curve's ({step: value}) best finite value and the first step it came at."""
    finite = {step: v for step, v in sorted(curve.items()) if math.isfinite(v)}
    value = (max if maximize else min)(finite.values())
    return value, next(step for step, v in finite.items() if v == value)


# The modules every `optimsweep` command imports (torch and MLflow: about 7 s per process
# start on a 2-core machine), imported once by multiprocessing's fork server, and what a
# sweep imports lazily: MLflow's SQL store, torch's compiler (the first optimizer), FashionMNIST
# and the study plots (preloaded.py): 6 to 7 s more per forked one-trial sweep. And this
# module, which each child would otherwise import (pytest with it) to find its body,
# `_cli_process`; `preloaded`, last, hides all of it from the children's garbage collector.
PRELOAD = ["optimsweep.cli", "optimsweep.run.runner", "optimsweep.run.study",
           "optimsweep.sweep.check", "optimsweep.report", "optimsweep.confirm",
           "optimsweep.export", "records", "preloaded"]
HERE = str(Path(__file__).parent)
CLONE_NEWUTS = 0x04000000  # <sched.h>: a host name of the process's own


def _cli_process(argv: list[str], cwd: str, env: dict, out: str, err: str,
                 script: str | None = None, new_session: bool = False,
                 hostname: str | None = None) -> None:
    """The body of a forked `optimsweep ARGV` (or `python SCRIPT ARGV`): its own folder,
    environment and output files (and process group, with `new_session`; and host name, with
    `hostname`), then the command line's own main (or the script as `__main__`), exit code
    and exit handlers."""
    import atexit
    import ctypes
    import faulthandler
    import io
    import runpy
    import socket

    if new_session:
        os.setsid()
    if hostname is not None:  # another machine, as far as host names tell: what
        # `unshare --uts` does (Python 3.11 has no os.unshare), then `hostname NAME`
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS) needs root")
        socket.sethostname(hostname)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    if "preloaded" not in sys.modules:  # the server skips a preload that fails to import
        raise RuntimeError("the fork server did not import tests/preloaded.py")
    if env.get("PYTHONFAULTHANDLER"):  # what Python does at start-up with it set
        faulthandler.enable()
    if script is None:
        from optimsweep.cli import main

        code = main(argv)
    else:  # as `python SCRIPT ARGV` runs it: its folder first on the path
        sys.argv = [script, *argv]
        sys.path.insert(0, os.path.dirname(script))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code
    atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit
    sys.exit(code)


@functools.cache
def fork_server():
    """The multiprocessing context `optimsweep` processes are forked from, its server
    started with PRELOAD on first use. Python has one fork server per process: `--workers`
    run in this process (run_cli, run_sweep) fork theirs from it too, so conftest starts
    it before any test runs; else a test's workers could start it without PRELOAD."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    # Python 3.11's fork server imports its preload before it takes this process's
    # sys.path, so it would skip this folder's `preloaded` in silence: it starts with the
    # folder on PYTHONPATH instead (its children get their own environment).
    path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    with mock.patch.dict(os.environ, {"PYTHONPATH": path}):
        forkserver.ensure_running()
    return context


class CliProcess:
    """`optimsweep ARGS` (or `python SCRIPT ARGS`) in a real process of its own (its pid
    takes real signals; its exit code and output are its own), forked from a server that
    imported the package once instead of starting Python anew: the Popen calls the tests
    use."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, script: str | None = None,
                 new_session: bool = False, hostname: str | None = None):
        context = fork_server()
        self.args = [script or "optimsweep", *argv]
        self._files = tempfile.mkdtemp(prefix="optimsweep-cli-")
        self._out, self._err = (os.path.join(self._files, n) for n in ("stdout", "stderr"))
        self._process = context.Process(
            target=_cli_process,
            args=(argv, str(cwd), env, self._out, self._err, script, new_session, hostname))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output_so_far(self) -> str:
        """What it has printed on stdout until now."""
        return Path(self._out).read_text()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        out, err = (Path(p).read_text() for p in (self._out, self._err))
        shutil.rmtree(self._files, ignore_errors=True)
        return out, err


def launch(argv: list, cwd: Path, env: dict, new_session: bool = False,
           hostname: str | None = None) -> CliProcess:
    """`optimsweep ARGV` in `cwd` with exactly the environment `env` (and a process group
    of its own with `new_session`, as a service manager starts it; the host name `hostname`,
    as on another machine)."""
    return CliProcess([str(a) for a in argv], cwd, env, new_session=new_session,
                      hostname=hostname)


def start(*args, cwd: Path, env: dict | None = None, new_session: bool = False) -> CliProcess:
    """`optimsweep ARGS` as a user runs it, in its own process."""
    return launch(list(args), cwd, {**os.environ, "PYTHONUNBUFFERED": "1",
                                    "OPTIMSWEEP_DATA": str(DATA), **(env or {})}, new_session)


def run_script(script: Path, *args, cwd: Path, timeout: float = 300) -> str:
    """`python SCRIPT ARGS` in `cwd`, as the script's user runs it but forked from the
    tests' server; what it printed, once it has exited 0."""
    process = CliProcess([str(a) for a in args], cwd,
                         {**os.environ, "OPTIMSWEEP_DATA": str(DATA)}, script=str(script))
    code, out, err = finish(process, timeout=timeout)
    assert code == 0, err
    return out


def finish(process, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_until(predicate, timeout: float = 60, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001  (a store still being created by the process)
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_trials(spec, with_run: bool = True) -> list:
    """The RUNNING trials (that already have their MLflow run)."""
    return [t for t in load_study(spec).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not with_run or "mlflow_run_id" in t.user_attrs]


def running_trial(spec, with_run: bool = True):
    """The first RUNNING trial (that already has its MLflow run), or None."""
    return next(iter(running_trials(spec, with_run)), None)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`optimsweep ARGS` in this process (where no separate process is needed)."""
    from optimsweep.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
