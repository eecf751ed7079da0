"""What a run needs to be reproduced later: the code's commit and the package versions."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("optimsweep", "torch", "torchvision", "optuna", "mlflow", "numpy", "pandas")


def _git(*args: str) -> str | None:
    """Asked where optimsweep's own code is, not where the command runs: the commit is of
    the code that trained, whatever folder the user sweeps from."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@cache
def provenance() -> dict[str, str]:
    """git commit (with '-dirty' when the work tree differs from it) and package versions."""
    info = {"python": platform.python_version()}
    # Only when optimsweep's own files are tracked there: a venv inside the user's repo
    # would otherwise report the user's commit as ours.
    commit = _git("ls-files", "--error-unmatch", "__init__.py") and _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info
