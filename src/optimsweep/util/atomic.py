"""Files written whole or not at all, and locks the kernel releases when a process dies.

Every file the tool writes goes through here (model weights too: artifacts.save_state_dict
writes with `write_atomic`): a crash, a Ctrl-C or a full disk leaves the old version or the
new one, never a mix.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """An exclusive lock between processes on this machine. flock, unlike a lock *file*,
    goes away with its process: a SIGKILLed holder never blocks the next command."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: Path | str, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call `write(file)` on a temporary file beside `path` (opened with `mode`), flush it to
    disk, and rename it to `path`; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_atomic(path, lambda fh: fh.write(text), "w")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system
    can't."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def folder_replaced(path: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error,
    it takes `path`'s place in one step where the system allows (else two renames), and the
    old folder is removed. On an error the temporary folder is removed and `path` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # it holds the old folder now
    else:
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def create_sqlite_atomically(path: Path | str, initialize: Callable[[str], None]) -> None:
    """Create the SQLite database at `path` by running `initialize(url)` on a temporary file
    and renaming it into place, once, however many processes ask at the same time.

    MLflow's and Optuna's stores migrate a new database in many steps: two processes doing it
    at once collide (`duplicate column name`), and a Ctrl-C halfway leaves a database every
    later command refuses. A temporary file that is renamed only when complete avoids both.
    """
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.create-lock")):
        if path.exists():  # another process created it while we waited
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        os.unlink(tmp)  # SQLite creates the file itself
        try:
            initialize(f"sqlite:///{tmp}")
            os.replace(tmp, path)
        finally:
            for leftover in (tmp, f"{tmp}-journal", f"{tmp}-wal", f"{tmp}-shm"):
                Path(leftover).unlink(missing_ok=True)
