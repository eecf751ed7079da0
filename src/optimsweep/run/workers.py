"""`--workers N`: N local processes on one study, each claiming and running its own trials;
the parent watches them, stops them on Ctrl-C or SIGTERM, and names any that failed."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time
import traceback
from multiprocessing import forkserver, resource_tracker

import torch

from optimsweep.errors import Interrupted, StoreError, WorkersFailed, describe
from optimsweep.records.schema import counted_trials
from optimsweep.run.context import OpenStudy, StudyRef
from optimsweep.run.loop import run_loop
from optimsweep.run.placement import Placement
from optimsweep.run.progress import Progress
from optimsweep.run.repair import repair
from optimsweep.run.study import attach, load_sweep_data
from optimsweep.util import signals
from optimsweep.util.terminal import quiet
from optimsweep.util.urls import redact_text

log = logging.getLogger("optimsweep")
WORKER_STOP_SECONDS = 60  # how long a worker may take to close its trial after SIGTERM


def run_worker(ref: StudyRef, deadline: float | None, n_workers: int, environ: dict,
               debug: bool = False) -> None:
    """A worker process: its parent's environment (not the fork server's, which is as it
    was when the server started), its share of the cores, quiet logs, and an exit code
    that says how it ended (0 done, 128+signal interrupted, 3 a store failed)."""
    # What the fork server imported is shared with it and the other workers: out of the
    # collector's sight, this worker's full collections neither walk it nor copy its pages
    # (a worker of a 2-worker line sweep kept 186 MiB private instead of 230).
    gc.freeze()
    signals.stop_on_signals(once=True)
    try:
        # The fork server's mask: a SIGTERM that came since the fork is raised here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.environ.clear()
        os.environ.update(environ)
        quiet(debug)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
        run_loop(attach(ref), load_sweep_data(ref.spec), deadline=deadline)
    except Interrupted as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001  (the parent names this worker; --debug shows why)
        if debug:
            print(redact_text(traceback.format_exc()), end="", file=sys.stderr)
        print(f"error: {describe(exc) if not isinstance(exc, StoreError) else exc}",
              file=sys.stderr)
        sys.exit(3)


def _fork_server() -> multiprocessing.context.ForkServerContext:
    """The workers' maker: multiprocessing's fork server, which imports this module once, so
    N workers pay for importing torch, MLflow and Optuna once, not N times (not plain fork:
    this process already runs threads, MLflow's and the heartbeat's, whose locks a fork
    could copy held). It starts with SIGTERM blocked, and keeps it so: a SIGTERM to the
    whole process group (systemd, Slurm, `timeout`) would kill it, and its parent would
    then read every worker as ended (exit code 255) while they still close their trials.
    It ignores SIGINT itself, and ends once this process and its workers have."""
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload([__name__])
    resource_tracker.ensure_running()  # before the mask: starting it unblocks SIGTERM here
    # This thread's mask, which the server inherits; a SIGTERM meanwhile still reaches
    # this process, through its other threads.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return mp


def run_workers(opened: OpenStudy, placements: list[Placement], deadline: float | None,
                progress: bool) -> None:
    """One worker process per placement, each seeing only its own GPUs."""
    mp = _fork_server()
    debug = log.isEnabledFor(logging.DEBUG)
    n = len(placements)
    processes = [mp.Process(target=run_worker,
                            args=(opened.ref, deadline, n, where.environ(dict(os.environ)),
                                  debug))
                 for where in placements]
    for p in processes:
        p.start()
    try:
        bar = Progress(opened.study, opened.spec.name, opened.ref.n_trials,
                       opened.spec.budget) if progress else None
        while any(p.is_alive() for p in processes):
            time.sleep(0.5)
            signals.check()
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
    finally:  # Ctrl-C or SIGTERM here: every worker closes its own trial, or is killed
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(WORKER_STOP_SECONDS)
            if p.is_alive():
                p.kill()
                p.join()
    problems = []
    for i, p in enumerate(processes):
        if p.exitcode == 0:
            continue
        if p.exitcode < 0:
            how = f"was killed by {signal.Signals(-p.exitcode).name}"
        elif p.exitcode > 128:
            how = f"was stopped by {signal.Signals(p.exitcode - 128).name}"
        else:
            how = f"failed (exit code {p.exitcode}, its error is above)"
        problems.append(f"worker {i} (pid {p.pid}) {how}")
    if not problems:
        return
    repair(opened)  # the trials of the ended workers: failed, not counted
    left = opened.ref.n_trials - len(counted_trials(opened.study))
    if left <= 0 or (deadline is not None and time.time() >= deadline):
        log.warning("; ".join(problems) + "; its trial was marked failed (interrupted) and "
                    "the other workers finished the sweep")
        return
    raise WorkersFailed("; ".join(problems) + f"; {left} trials of the budget remain: run "
                        "the same command again to finish them")
