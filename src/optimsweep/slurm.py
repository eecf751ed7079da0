"""`optimsweep slurm`: a study's workers as a Slurm job array. Each array task is one worker
(with GPUs, one per GPU the task is given) against the study's stores; the script written
here carries everything it needs, so `sbatch` alone runs it, and nothing secret is in it.

What the script does about preemption, the common case on shared clusters:
- Preemption, `scontrol requeue` and `scancel` send SIGTERM to every process of the task.
  The worker writes its trial's last finished epoch as a checkpoint and closes the trial as
  interrupted; the shell only waits for it. With `--requeue` Slurm starts the task again
  (preemption, requeue), and the retry of the trial goes on from the checkpoint.
- The time limit: `--signal=B:USR1@LEAD` warns the shell alone, LEAD seconds before. It
  stops the worker the same way and requeues the task itself, since Slurm requeues no job
  that ran out of time. (SIGTERM could not carry this: `scancel` sends it too, and a
  cancelled array must stay cancelled.)
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from optimsweep.errors import SpecError, UsageError
from optimsweep.records.storage import is_journal, resolve_storage
from optimsweep.records.tracking import resolve_tracking_uri
from optimsweep.sweep.spec import Spec
from optimsweep.util.atomic import write_text_atomic
from optimsweep.util.urls import redact

CLOSE_SECONDS = 30  # a worker's last checkpoint write and its store calls, stores answering
TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # Slurm's --time forms
# What a task's shell needs to find the tools (the job gets none of the submitter's
# environment: any secret in it would be recorded with the job).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def stop_seconds(spec: Spec) -> int:
    """How long before it is killed a worker must be told to stop: the last checkpoint's
    write and the trial's closing calls, each retried for `store_timeout` if a store is
    slow to answer."""
    return int(CLOSE_SECONDS + spec.resilience.store_timeout)


@dataclass(frozen=True)
class ArrayJob:
    """One study's workers as a job array: what `sbatch` is asked for and what each task
    runs."""

    spec: Spec
    tasks: int
    logs: Path
    lead: int  # seconds of warning before the time limit
    gpus_per_task: int | None = None
    gpus_per_worker: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    requeue: bool = True

    def __post_init__(self):
        if self.tasks < 1:
            raise UsageError(f"--array: {self.tasks} must be >= 1 (array tasks, one worker "
                             "each)")
        for flag, value in (("--gpus-per-task", self.gpus_per_task),
                            ("--gpus-per-worker", self.gpus_per_worker),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise UsageError(f"{flag}: {value} must be >= 1")
        if self.gpus_per_worker and (self.gpus_per_task or 0) < self.gpus_per_worker:
            raise UsageError(f"--gpus-per-worker: {self.gpus_per_worker} is more than the "
                             f"{self.gpus_per_task or 0} GPUs each task asks for "
                             "(--gpus-per-task)")
        if self.time is not None and not TIME.match(self.time):
            raise UsageError(f"--time: {self.time!r} is not a Slurm time: MINUTES, "
                             "HOURS:MINUTES:SECONDS or DAYS-HOURS[:MINUTES]")
        if self.lead < 1:
            raise UsageError(f"--lead: {self.lead} must be >= 1 (seconds)")


def stores(spec: Spec) -> dict[str, str]:
    """The two store URLs every task exports, refused when one holds a password: the script,
    Slurm's copy of the job and its environment would keep it."""
    urls = {"OPTIMSWEEP_STORAGE": resolve_storage(spec.storage),
            "MLFLOW_TRACKING_URI": resolve_tracking_uri(spec.tracking_uri)}
    for name, url in urls.items():
        if redact(url) != url:
            raise SpecError(
                f"{spec.path}: {name} {redact(url)} holds a password, which the job script "
                "and Slurm's record of the job would keep: name a password file instead "
                "(`passfile=PATH` in a postgresql URL, as `make services` prints it; "
                "~/.mlflow/credentials for a tracking server)")
    for name, url in urls.items():  # files: the tasks must find them from their folder
        if is_journal(url):
            urls[name] = str(Path(url).resolve())
        elif url.startswith("sqlite:///"):
            urls[name] = f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
    return urls


def shared_disk_note(urls: dict[str, str]) -> str | None:
    local = [u for u in urls.values() if is_journal(u) or u.startswith("sqlite:")]
    if local:
        return (f"the stores are files ({', '.join(local)}): every node that runs a task "
                "must see them (one node, or a shared file system); for many nodes use "
                "PostgreSQL and a tracking server (`make services`)")
    return None


def script(job: ArrayJob, *, workdir: Path, command: list[str],
           environ: dict[str, str]) -> str:
    """The job array script. `command`: the worker's own command line, up to the sweep
    file; `environ`: variables each task exports (the stores, the data folder)."""
    spec = job.spec
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# The workers of study {spec.name!r} as a Slurm job array: each task is one "
             "worker,",
             "# one per GPU it is given, claiming trials until the study's budget is used.",
             f"# Written by `optimsweep slurm {spec.path.name} --array {job.tasks}`; submit "
             "it with sbatch.",
             f"#SBATCH --job-name=optimsweep-{spec.name}",
             f"#SBATCH --array=0-{job.tasks - 1}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --output={job.logs}/%x-%A_%a.out",
             "#SBATCH --open-mode=append",
             # the submitter's environment, and any secret in it, stays out of the job
             "#SBATCH --export=NONE"]
    if job.requeue:
        lines.append("#SBATCH --requeue")
    lines.append(f"#SBATCH --signal=B:USR1@{job.lead}")
    for flag, value in (("partition", job.partition), ("time", job.time),
                        ("gpus-per-task", job.gpus_per_task),
                        ("cpus-per-task", job.cpus_per_task)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    worker = [*command, "sweep", str(spec.path.resolve()), "--no-progress", "--workers",
              "auto"]
    if job.gpus_per_worker:
        worker += ["--gpus-per-worker", str(job.gpus_per_worker)]
    task = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    lines += [
        "",
        f"# --signal: the time limit's warning, {job.lead} s before it: enough to write the",
        f"# last checkpoint and close the trial (the sweep's store_timeout + {CLOSE_SECONDS} s).",
        "set -u",
        f"cd {q(str(workdir))}",
        f"export PATH={q(str(Path(command[0]).parent) + ':' + BASE_PATH)}",
        *(f"export {k}={q(v)}" for k, v in environ.items()),
        "# torch's threads: the CPUs Slurm gave the task, not every core of the node",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        f'echo "optimsweep: task {task}, restart ${{SLURM_RESTART_COUNT:-0}}, on '
        f'$(hostname), $(date -Is)"',
        "",
        "# Preemption, `scontrol requeue` and `scancel` send SIGTERM to every process of the",
        "# task: the worker writes its last finished epoch and closes its trial, and this",
        "# shell waits for it. The time limit's USR1 reaches only this shell: it stops the",
        "# worker the same way, then requeues the task (Slurm requeues none that ran out",
        "# of time); started again, the trial's retry goes on from the checkpoint.",
        "requeue=0",
        "trap ':' TERM",
        f"trap 'requeue={int(job.requeue)}; kill -TERM \"$worker\" 2>/dev/null' USR1",
        " ".join(q(a) for a in worker) + " &",
        "worker=$!",
        "while :; do",
        '  wait "$worker"; status=$?',
        '  if [ "$status" -gt 128 ] && kill -0 "$worker" 2>/dev/null; then continue; fi',
        "  break  # a signal's trap returns wait early; the worker goes on until it closes",
        "done",
        'if [ "$requeue" = 1 ] && [ "$status" != 0 ]; then',
        f'  echo "optimsweep: the time limit is near: requeueing {task}"',
        f'  scontrol requeue "{task}"',
        "fi",
        'exit "$status"',
        ""]
    return "\n".join(lines)


def worker_command() -> list[str]:
    """This installation's `optimsweep`, by absolute path: a task finds it whatever its
    PATH (the virtual environment is not activated there)."""
    found = Path(sys.executable).with_name("optimsweep")
    if found.exists():
        return [str(found)]
    return [sys.executable, "-m", "optimsweep.cli"]


def task_environ(urls: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """What each task exports: the stores, the data folder, and the libpq password file
    the submitter named (a path, never a password)."""
    out = dict(urls)
    if environ.get("HOME"):
        out["HOME"] = environ["HOME"]  # caches, ~/.mlflow/credentials
    data = environ.get("OPTIMSWEEP_DATA")
    out["OPTIMSWEEP_DATA"] = str(Path(data).resolve()) if data else str(Path("data").resolve())
    if environ.get("PGPASSFILE"):
        out["PGPASSFILE"] = str(Path(environ["PGPASSFILE"]).resolve())
    return out


def write(job: ArrayJob, path: Path, urls: dict[str, str], environ: dict[str, str]) -> Path:
    """The script at `path` (whole, or not at all); `urls`: `stores(job.spec)`."""
    text = script(job, workdir=Path.cwd(), command=worker_command(),
                  environ=task_environ(urls, environ))
    job.logs.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text).chmod(0o700)
    return path


class SlurmError(UsageError):
    """Slurm refused the job (its own answer, in one line) or is not installed here."""


def submit(path: Path, environ: dict[str, str]) -> str:
    """`sbatch PATH`: the array's job id, or Slurm's refusal in one line."""
    if shutil.which("sbatch", path=environ.get("PATH")) is None:
        raise SlurmError("sbatch: not found: Slurm's commands are not on PATH (Debian: "
                         f"slurm-client); the script is written, submit it where they are: "
                         f"sbatch {path}")
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True,
                          text=True, env=environ, timeout=120)
    if done.returncode != 0:
        said = [line.strip().removeprefix("sbatch: ") for line in done.stderr.splitlines()
                if line.strip()]
        first = said[0] if said else f"exit code {done.returncode}"  # the most precise
        raise SlurmError(f"sbatch refused {path}: {first}")
    return done.stdout.strip().split(";")[0]


def default_paths(spec: Spec) -> tuple[Path, Path]:
    """Where the script and the tasks' output go by default: slurm/STUDY.sbatch and
    slurm/logs/."""
    return Path("slurm") / f"{spec.name}.sbatch", Path("slurm") / "logs"

