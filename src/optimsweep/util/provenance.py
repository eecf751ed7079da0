"""What a run needs to be reproduced later: the code's commit and the package versions."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("optimsweep", "torch", "torchvision", "optuna", "mlflow", "numpy", "pandas")
# Where git is asked about optimsweep's own code, not where the command runs: the commit is
# of the code that trained, whatever folder the user sweeps from.
OWN_FOLDER = Path(__file__).parent


def git(folder: Path | str, *args: str) -> str | None:
    """`git ARGS` run in `folder`: its output, stripped; None when it fails or prints
    nothing (no git, not a repository, an untracked file)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             check=True, cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@cache
def provenance() -> dict[str, str]:
    """git commit (with '-dirty' when the work tree differs from it) and package versions."""
    info = {"python": platform.python_version()}
    # Only when optimsweep's own files are tracked there: a venv inside the user's repo
    # would otherwise report the user's commit as ours.
    commit = (git(OWN_FOLDER, "ls-files", "--error-unmatch", "__init__.py")
              and git(OWN_FOLDER, "rev-parse", "HEAD"))
    if commit:
        dirty = git(OWN_FOLDER, "status", "--porcelain", "--untracked-files=no")
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def slurm_task(environ) -> str | None:
    """The Slurm job (array task) this process runs in, and how often it was requeued:
    "1234_3 restart 2"; None outside Slurm."""
    job = environ.get("SLURM_ARRAY_JOB_ID") or environ.get("SLURM_JOB_ID")
    if not job:
        return None
    task = environ.get("SLURM_ARRAY_TASK_ID")
    restarts = environ.get("SLURM_RESTART_COUNT", "0")
    return f"{job}{'_' + task if task else ''} restart {restarts}"
