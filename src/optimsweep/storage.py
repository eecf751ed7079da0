"""Optuna's storages: a journal file for one machine, an RDB (PostgreSQL) for many.

Opening a store here makes it safe to share: SQLite databases are created atomically, a
journal's torn last line (a write cut short by a crash or a full disk) is set aside before
anything is appended to it, and `study_lock` gives one process at a time the right to create
a study or claim a trial of the budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages.journal._file import BaseJournalFileLock

from optimsweep.atomic import create_sqlite_atomically, file_lock, write_text_atomic
from optimsweep.urls import redact, redact_text

DEFAULT_STORAGE = "mlruns/optuna.journal"
log = logging.getLogger("optimsweep")


class StoreError(RuntimeError):
    """A store (Optuna's storage or MLflow's tracking store) can't be read or written.

    Not the trial's fault: the trial that hit it does not use up budget, and the sweep stops
    with this one line."""


def describe(exc: BaseException) -> str:
    """One line about an exception, with no password in it."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not text or not type(exc).__module__.startswith("optimsweep"):  # ours say enough
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact_text(text)[:500]


def _store_failures() -> tuple[type[BaseException], ...]:
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    return (OSError, sqlalchemy.exc.SQLAlchemyError, MlflowException,
            optuna.exceptions.StorageInternalError)


# What a store raises when it fails (a full disk, a database gone): a store failure, however
# it reaches the command line.
STORE_FAILURES = _store_failures()


def storage_call(fn, *args, **kwargs):
    """Call Optuna: its storage failing is a store failure (one line, the trial uncounted),
    not the trial's own."""
    try:
        return fn(*args, **kwargs)
    except (StoreError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise StoreError(f"study storage: {describe(exc)}") from exc


def resolve_storage(spec_storage: str | None = None) -> str:
    return os.environ.get("OPTIMSWEEP_STORAGE") or spec_storage or DEFAULT_STORAGE


def is_journal(url: str) -> bool:
    return "://" not in url


class _FlockLock(BaseJournalFileLock):
    """Optuna's journal lock, held with flock: released by the kernel if its holder dies,
    where Optuna's symlink lock would stall every other process for its 30 s grace period.
    Whoever holds it first sets aside a torn last line, so no append ever lands on one (a
    process that opened the journal before a crash elsewhere would otherwise do just that)."""

    def __init__(self, journal: Path):
        self._journal, self._path, self._fd = journal, _lock_path(journal, "append"), None

    def acquire(self) -> bool:
        import fcntl

        self.release()  # a lock a signal kept us from releasing: ours, so let it go
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _set_torn_tail_aside(self._journal)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _lock_path(path: Path | str, kind: str) -> str:
    path = Path(path)
    return str(path.with_name(f".{path.name}.{kind}-lock"))


def _set_torn_tail_aside(path: Path) -> None:
    """With the append lock held: a last line without its newline is a record whose write
    never completed (so no reader used it); move it to a side file and cut it off."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            start = size
            while True:  # back to the last newline, however long the torn line is
                start = max(0, start - (1 << 20))
                fh.seek(start)
                tail = fh.read()
                if start == 0 or b"\n" in tail:
                    break
    except FileNotFoundError:
        return
    end = size - len(tail) + tail.rfind(b"\n") + 1
    torn = tail[tail.rfind(b"\n") + 1:]
    aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    write_text_atomic(aside, torn.decode("utf-8", "replace"))
    with open(path, "r+b") as fh:
        fh.truncate(end)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning(f"{path}: its last line was cut short by an earlier crash or a full disk "
                f"({len(torn)} bytes); set aside in {aside.name}, the rest is intact")


def _set_torn_tail_aside_now(path: Path) -> None:
    lock = _FlockLock(path)
    lock.acquire()  # which sets a torn tail aside
    lock.release()


def _bad_journal_line(path: Path) -> StoreError:
    """Optuna refuses a journal with a bad line before its end but doesn't say which: find
    it (only then, so a healthy journal is parsed once, by Optuna)."""
    number = next((n for n, line in enumerate(path.read_bytes().splitlines(), 1)
                   if not _parses(line)), "?")
    return StoreError(f"{path}: line {number} is not a whole journal record, so the study "
                      "can't be read; keep a copy of the file, then remove that line or start "
                      "a new study file")


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _create_rdb(url: str) -> None:
    optuna.storages.RDBStorage(url).engine.dispose()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A URL (postgresql://, sqlite:///) is an RDB; anything else is a journal file path,
    which several local worker processes can share safely (SQLite can't)."""
    try:
        if not is_journal(url):
            if url.startswith("sqlite:///"):
                create_sqlite_atomically(url.removeprefix("sqlite:///"), _create_rdb)
            return optuna.storages.RDBStorage(url)
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        _set_torn_tail_aside_now(path)  # else Optuna would silently drop that last record
        backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=_FlockLock(path))
        try:
            return optuna.storages.JournalStorage(backend)
        except ValueError as exc:  # json's errors are ValueErrors, and so is Optuna's own
            raise _bad_journal_line(path) from exc
    except StoreError:
        raise
    except ImportError as exc:
        raise StoreError(f"storage {redact(url)}: its database driver is missing ({exc.name}); "
                         "install optimsweep's `postgres` extra") from exc
    except Exception as exc:
        raise StoreError(f"storage {redact(url)}: {describe(exc)}") from exc


@contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """One process at a time may create the study or claim a trial of its budget."""
    if is_journal(url):
        with file_lock(_lock_path(url, "study")):
            yield
    elif url.startswith("sqlite:///"):
        with file_lock(_lock_path(url.removeprefix("sqlite:///"), "study")):
            yield
    else:  # a server database: an advisory lock, released if the connection dies
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
