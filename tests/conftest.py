"""Shared fixtures: small real data (loaded once), the regression task, temporary stores."""

from __future__ import annotations

import os

# `make test` runs the suite in parallel workers (pytest-xdist): each gets its share of the
# cores for torch's threads, as do the processes it starts, which inherit this: two workers
# of two threads each on two cores spent a third more CPU time than one worker, their threads
# spinning while they waited for a core the other worker held. Set before torch is imported
# (its OpenMP reads it once, when it loads).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402

# torch, MLflow and Optuna are imported by the fixtures that need them, not here: with
# `-n`, pytest's controlling process loads this file too, before it starts the workers, and
# it runs no test (about 5 CPU seconds at the suite's start, with the other core idle).

# The MLflow servers the tests start (`mlflow server` for `servers` below and the tests that
# restart it, `mlflow ui` for test_ui) inherit this: without it, each start also launches
# MLflow's job runner, some ten more Python processes (Huey consumers for MLflow's GenAI
# jobs) that import MLflow for about 20 CPU seconds, competing with the processes under test
# on a 2-core machine and making every stop and restart slower. optimsweep submits no jobs;
# the tracking API and the UI the tests use are served the same either way.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


SERVER_TESTS = "tests/test_servers.py"
# The Slurm tests use the same servers: they run on the same pytest worker, after these.
SERVER_FILES = (SERVER_TESTS, "tests/test_slurm.py")


def pytest_xdist_make_scheduler(config, log):
    """`make test`'s workers take the tests one by one, but test_servers.py's as one unit,
    first (the largest unit goes first): one worker starts one PostgreSQL and one MLflow
    server for all of them, instead of each worker its own (about 20 CPU seconds a start:
    MLflow's imports and migrations). xdist's `--dist loadgroup` and an `xdist_group` mark
    would say this, but with pytest 9.2 they group nothing (pytest-xdist issue 1386)."""
    from xdist.scheduler import LoadScopeScheduling

    class ServerTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SERVER_TESTS if nodeid.startswith(SERVER_FILES) else nodeid

    return ServerTestsTogether(config, log)


# The longest tests, started first: the workers take tests in the order they were collected,
# so a long one collected last (the UI test, say) kept one worker going for seconds after the
# other had finished.
LONGEST = ("tests/test_learning.py", "tests/test_ui.py", "tests/test_bench.py",
           "tests/test_examples.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST))  # else as collected


@pytest.fixture(scope="session")
def fashion_small():
    """5k real FashionMNIST training images, the first 1k images of the standard validation
    split (all 10k of it added about a fifth to each fit: two epochs of Adam took 0.75 s
    against 0.61 s) and the standard 10k test images."""
    import dataclasses

    from core_helpers import load_fashion_mnist

    data = load_fashion_mnist(train_subset=5_000)
    return dataclasses.replace(data, val_x=data.val_x[:1_000], val_y=data.val_y[:1_000])


@pytest.fixture(scope="session")
def fashion_tutorial():
    """59k training images, as close to the tutorial's 60k as a 1k validation split allows."""
    from core_helpers import load_fashion_mnist

    return load_fashion_mnist(val_size=1_000)


@pytest.fixture
def line():
    """The seed's y = 0.7 x + 0.3 regression task."""
    from core_helpers import make_regression

    return make_regression()


@pytest.fixture(scope="session", autouse=True)
def imports_frozen():
    """What collecting the tests imported (torch, MLflow, Optuna, the package) stays for the
    whole session: out of the garbage collector's sight, each full collection walks only what
    the tests made since. (It walked it all, each time, 0.1 to 0.3 CPU seconds.)"""
    import gc

    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def fork_server():
    """The tests' fork server, started first: `--workers` run in a test's own process fork
    from this process's one fork server too (records.fork_server). Its imports run in the
    server while the first tests do."""
    import records

    return records.fork_server()


@pytest.fixture(scope="session")
def servers():
    """A real PostgreSQL and `mlflow server`, started by the same code as `make services`
    (installing Debian's postgresql where it is missing and we are root), stopped after;
    without MLflow's job runner (see above). Where they can't be had the tests skip, except
    in CI, where that is a failure."""
    import shutil
    import tempfile

    from optimsweep import services
    from serving import free_port

    folder = tempfile.mkdtemp(prefix="optimsweep-services-")  # /tmp: the postgres user reaches it
    try:
        endpoints = services.start(folder, free_port(), free_port())
    except services.ServiceError as exc:
        services.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL and the MLflow server are required in CI: {exc}")
        pytest.skip(f"no PostgreSQL here: {exc}")
    yield endpoints
    services.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-machine Slurm (munge, slurmctld, slurmd), started by the same code as
    `optimsweep services start --slurm` (installing Debian's slurm-wlm where it is missing
    and we are root), stopped after. Where it can't be had the tests skip, except in CI."""
    from optimsweep import local_slurm
    from optimsweep.errors import ServiceError
    from serving import free_port

    folder = tmp_path_factory.mktemp("slurm")
    try:
        cluster = local_slurm.start(folder, free_port(), free_port())
    except (ServiceError, OSError) as exc:
        local_slurm.stop(folder)
        if os.environ.get("CI"):
            pytest.fail(f"a one-machine Slurm is required in CI: {exc}")
        pytest.skip(f"no Slurm here: {exc}")
    yield cluster
    local_slurm.stop(folder)
