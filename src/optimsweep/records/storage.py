"""Optuna's storages: a journal file for one machine, an RDB (PostgreSQL) for many.

Opening a store here makes it safe to share: SQLite databases are created atomically, a
journal's torn last line (a write cut short by a crash or a full disk) is set aside before
anything is appended to it, and `StudyStorage.lock` gives one process at a time the right
to create a study or claim a trial of the budget.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from optimsweep.errors import StoreError, chain, describe
from optimsweep.records.optuna_adapter import (
    BaseJournalFileLock,
    heartbeat_enabled,
    stale_trial_ids,
)
from optimsweep.records.schema import Attr
from optimsweep.util import signals
from optimsweep.util.atomic import create_sqlite_atomically, file_lock, write_text_atomic
from optimsweep.util.urls import redact

DEFAULT_STORAGE = "mlruns/optuna.journal"
log = logging.getLogger("optimsweep")


@functools.cache
def store_failures() -> tuple[type[BaseException], ...]:
    """What a store raises when it fails (a full disk, a database gone): a store failure,
    however it reaches the command line. (Imported when asked: a process that only reads
    sweep files, as the benchmarks' do, needs no MLflow, which takes seconds to import.)"""
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    return (OSError, sqlalchemy.exc.SQLAlchemyError, MlflowException,
            optuna.exceptions.StorageInternalError)


@dataclass(frozen=True)
class Resilience:
    """How a study rides out its servers: Optuna's heartbeat on a server database (a trial
    silent for `grace_period` seconds is failed, and retried by a live worker up to
    `max_retry` times), and how long a store that went away is retried before giving up."""

    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    store_timeout: float = 60.0


def _lost_connection(exc: BaseException) -> bool:
    """The database went away (restart, network): worth trying again. Anything else (a
    constraint, a finished trial) would fail the same way again."""
    import sqlalchemy

    return any(isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
               or (isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated)
               for e in chain(exc))


def resolve_storage(spec_storage: str | None = None) -> str:
    return os.environ.get("OPTIMSWEEP_STORAGE") or spec_storage or DEFAULT_STORAGE


def is_journal(url: str) -> bool:
    return "://" not in url


class JournalFile:
    """The journal file this process opened, known by identity: its inode, its first line
    (the study store's creation, with Optuna's random worker id in it) and the last whole
    line read so far. Optuna reads and appends by path, at offsets it remembers: a journal
    deleted or replaced under a running sweep would be appended to anew (every claim then
    got the same trial id) or read at another file's offsets. `check` finds that out."""

    _MARK = 64  # bytes before the last known line end, compared at each check

    def __init__(self, path: Path):
        self.path = path
        stat = os.stat(path)
        self._identity = (stat.st_dev, stat.st_ino)
        self._head = b""  # the first line, once the file has one
        self._end, self._mark = 0, b""  # a line end known to be in the file, and before it
        self._lost: StoreError | None = None
        self.check()

    def _fail(self, what: str) -> StoreError:
        self._lost = StoreError(
            f"{self.path}: the study's journal was {what} while this sweep ran; stopped "
            "without writing more to it. Restore the file (the study's records are in it) or "
            "give the sweep a new name")
        return self._lost

    def check(self) -> None:
        """Raise StoreError (each time, once found) when the file at `path` is no longer
        the one opened: deleted, moved over, rewritten in place or cut short."""
        if self._lost is not None:
            raise self._lost
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._fail("deleted") from None
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != self._identity:
                raise self._fail("replaced by another file")
            if stat.st_size < self._end or self._rewritten(fd, self._end):
                raise self._fail("rewritten (another journal copied over it?)")
            if not self._head:
                first = os.pread(fd, 1 << 16, 0)
                self._head = first[:first.find(b"\n") + 1] if b"\n" in first else b""
            tail = os.pread(fd, 4096, max(0, stat.st_size - 4096))
            if b"\n" in tail:  # a torn last line (no newline yet) may still be set aside
                self._end = max(0, stat.st_size - 4096) + tail.rfind(b"\n") + 1
                self._mark = tail[:tail.rfind(b"\n") + 1][-self._MARK:]
        finally:
            os.close(fd)

    def _rewritten(self, fd: int, end: int) -> bool:
        """The open file `fd` no longer starts with the first line known, or no longer has
        the last known bytes just before `end`."""
        return bool(self._head and os.pread(fd, len(self._head), 0) != self._head) or bool(
            self._mark and os.pread(fd, len(self._mark), end - len(self._mark)) != self._mark)

    def append(self, data: bytes) -> None:
        """Append `data` (whole lines), under the journal lock and after `check`, and make
        sure it went where the file opened ends. A copy landing between the check and the
        write (`cp` takes no lock) would let it into another study's journal: it is cut
        off again, and StoreError raised."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
            landed = os.lseek(fd, 0, os.SEEK_CUR) - len(data)
            stat = os.fstat(fd)
            foreign = (stat.st_dev, stat.st_ino) != self._identity or landed != self._end \
                or self._rewritten(fd, landed)
            if foreign:
                if stat.st_size == landed + len(data):  # still the last thing in it
                    os.ftruncate(fd, landed)
                raise self._fail("rewritten (another journal copied over it?)")
            self._end, self._mark = landed + len(data), (self._mark + data)[-self._MARK:]
        finally:
            os.close(fd)


class _WatchedJournalBackend(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file backend, its appends made by `JournalFile.append`: written
    only where the journal this process opened ends, never into a file put in its place."""

    def __init__(self, journal: JournalFile, lock: BaseJournalFileLock):
        super().__init__(str(journal.path), lock_obj=lock)
        self._journal, self._append_lock = journal, lock

    def append_logs(self, logs: list[dict]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n")
        self._append_lock.acquire()  # checks the file is still the one opened
        try:
            self._journal.append(data.encode("utf-8"))
        finally:
            self._append_lock.release()


class _FlockLock(BaseJournalFileLock):
    """Optuna's journal lock, held with flock: released by the kernel if its holder dies,
    where Optuna's symlink lock would stall every other process for its 30 s grace period.
    Whoever holds it first sets aside a torn last line, so no append ever lands on one (a
    process that opened the journal before a crash elsewhere would otherwise do just that).
    With `watch`, every append first checks the journal is still the one opened: nothing is
    ever written into a new file or another study's journal."""

    def __init__(self, journal: Path, watch: JournalFile | None = None):
        self._journal, self._path, self._fd = journal, _lock_path(journal, "append"), None
        self._watch = watch

    def acquire(self) -> bool:
        import fcntl

        self.release()  # a lock a signal kept us from releasing: ours, so let it go
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._watch is not None:
                self._watch.check()
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


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, which queues the trial's params again.
    The new trial inherits only its config and what it retries (`retry_of`): Optuna would
    copy every user attr, the dead trial's run id and `interrupted` flag with them."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retries = trial.user_attrs.get(Attr.RETRIES, 0)
        if self._max_retry is not None and retries >= self._max_retry:
            return  # counted the same way as the claim's own retries
        clean = copy.copy(trial)
        clean.user_attrs = {Attr.RETRY_OF: trial.number, Attr.RETRIES: retries + 1,
                            **({Attr.BASELINE: True} if trial.user_attrs.get(Attr.BASELINE)
                               else {})}
        super().__call__(study, clean)


# One engine per server database and process: its pool is what bounds the connections.
_SERVER_STORAGES: dict[tuple[str, Resilience], optuna.storages.RDBStorage] = {}
# A trial's calls + its heartbeat, or a claim + the study lock (plus, while a process first
# opens the database, the lock that lets one process at a time create Optuna's tables).
CONNECTIONS_PER_PROCESS = 2


def _server_storage(url: str, resilience: Resilience) -> optuna.storages.RDBStorage:
    """PostgreSQL for many machines: Optuna's heartbeat and stale-trial retry, a pool of
    at most two connections named after this process, checked before use (a restarted
    server leaves dead ones behind)."""
    key = (url, resilience)  # another sweep file in this process may ride outages otherwise
    if key not in _SERVER_STORAGES:
        name = f"optimsweep {socket.gethostname()} pid {os.getpid()}"[:63]
        with warnings.catch_warnings(), _one_at_a_time(url, "optimsweep schema", "init " + name):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _SERVER_STORAGES[key] = optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_size": CONNECTIONS_PER_PROCESS, "max_overflow": 0,
                               "pool_pre_ping": True, "pool_timeout": 120,
                               "connect_args": {"application_name": name,
                                                "connect_timeout": 10}},
                heartbeat_interval=resilience.heartbeat_interval,
                grace_period=resilience.grace_period,
                heartbeat_stale_trial_callback=RetryStaleTrial(
                    max_retry=resilience.max_retry))
    return _SERVER_STORAGES[key]


def _lock_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@contextmanager
def _one_at_a_time(url: str, what: str, application_name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock on a connection of its own: workers starting together on
    a fresh database would race in Optuna's CREATE TABLEs (duplicate key in pg_type)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args={
        "application_name": application_name, "connect_timeout": 10})
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"),
                         {"k": _lock_key(what)})
            yield
    finally:
        engine.dispose()


def open_storage(url: str, resilience: Resilience | None = None
                 ) -> optuna.storages.BaseStorage:
    """A URL (postgresql://, sqlite:///) is an RDB; anything else is a journal file path,
    which several local worker processes can share safely (SQLite can't)."""
    return _open(url, resilience, watch=False)[0]


def _open(url: str, resilience: Resilience | None, *, watch: bool
          ) -> tuple[optuna.storages.BaseStorage, JournalFile | None]:
    """open_storage, and with `watch` the journal file it opened, known by identity: then
    every append checks it is still that file."""
    try:
        if not is_journal(url):
            if url.startswith("sqlite:///"):
                create_sqlite_atomically(url.removeprefix("sqlite:///"), _create_rdb)
                return optuna.storages.RDBStorage(url), None
            return _server_storage(url, resilience or Resilience()), None
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        _set_torn_tail_aside_now(path)  # else Optuna would silently drop that last record
        journal = None
        if watch:
            path.touch()  # Optuna creates it too; its identity is taken before anything is read
            journal = JournalFile(path)
        lock = _FlockLock(path, journal)
        backend = (_WatchedJournalBackend(journal, lock) if journal is not None else
                   optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock))
        try:
            return optuna.storages.JournalStorage(backend), journal
        except ValueError as exc:  # json's errors are ValueErrors, and so is Optuna's own
            raise _bad_journal_line(path) from exc
    except StoreError:
        raise
    except ImportError as exc:
        raise StoreError(f"storage {redact(url)}: its database driver is missing ({exc.name}); "
                         "install optimsweep's `postgres` extra") from exc
    except Exception as exc:
        raise StoreError(f"storage {redact(url)}: {describe(exc)}") from exc


class StudyStorage:
    """Optuna's storage of a study's records, as this process uses it: with the settings it
    rides out an outage by (the sweep file's `heartbeat:` and `store_timeout:`), the study
    lock, and a trial's heartbeat."""

    def __init__(self, url: str, resilience: Resilience | None = None):
        self.url = url
        self.resilience = resilience or Resilience()
        # the journal file opened, by identity (None for a database)
        self.optuna, self.journal = _open(url, self.resilience, watch=True)
        self._gave_up = False  # the database stayed away for a whole store_timeout once

    def check_intact(self) -> None:
        """Raise StoreError once the journal opened was deleted or replaced (a server or
        SQLite database: nothing to check). Called under the study lock at each claim and
        repair, before each epoch's writes; every append checks it too."""
        if self.journal is not None:
            self.journal.check()

    def still_running(self, trial_id: int) -> bool:
        """False once the trial was finished by another process (on a server storage,
        whose heartbeat lets another worker fail a trial silent for the grace period: this
        process was paused or cut off that long). Elsewhere only a process that has ended
        loses its trials, so no read is spent on it. Raises StoreError for a lost journal."""
        self.check_intact()
        if not self.heartbeat_enabled:
            return True
        return self.call(self.optuna.get_trial, trial_id).state == TrialState.RUNNING

    @property
    def heartbeat_enabled(self) -> bool:
        return heartbeat_enabled(self.optuna)

    def call(self, fn, *args, retry: bool = True, **kwargs):
        """Call Optuna: its storage failing is a store failure (one line, the trial
        uncounted), not the trial's own. A lost database connection is tried again with
        backoff for `store_timeout` seconds first (not with `retry=False`: inside the study
        lock, whose connection went with it)."""
        deadline, pause = time.monotonic() + self.resilience.store_timeout, 0.5
        while True:
            try:
                with signals.held():  # not between a write and its commit
                    return fn(*args, **kwargs)
            except (StoreError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self.check_intact()  # a journal lost under Optuna: say that, not its error
                lost = _lost_connection(exc)
                if not (retry and lost and not self._gave_up
                        and time.monotonic() + pause < deadline):
                    self._gave_up = self._gave_up or lost  # later calls fail at once
                    raise StoreError(f"study storage: {describe(exc)}") from exc
                log.debug(f"study storage unreachable ({describe(exc)}); again in {pause:.1f} s")
                time.sleep(pause)
                signals.check()
                pause = min(2 * pause, 8.0)

    @contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        """One process at a time may create the study or claim a trial of its budget."""
        url = self.url
        if is_journal(url):
            with file_lock(_lock_path(url, "study")):
                yield
        elif url.startswith("sqlite:///"):
            with file_lock(_lock_path(url.removeprefix("sqlite:///"), "study")):
                yield
        else:  # a server database: an advisory lock, held by a transaction of the storage's
            import sqlalchemy  # own pool, so it ends with the transaction or the connection

            try:
                conn = self.optuna.engine.connect()
                transaction = conn.begin()
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"),
                             {"k": _lock_key(study_name)})
            except sqlalchemy.exc.SQLAlchemyError as exc:
                raise StoreError(f"study storage {redact(url)}: {describe(exc)}") from exc
            try:
                yield
            finally:
                try:
                    transaction.rollback()  # nothing was written on it: this just unlocks
                    conn.close()
                except sqlalchemy.exc.SQLAlchemyError:
                    conn.invalidate()  # the server went away, and the lock with it

    def stale_trial_ids(self, study: optuna.Study) -> set[int]:
        """Trial ids whose heartbeat (server storages only) is older than the grace period.
        Called under the study lock: not retried."""
        if not self.heartbeat_enabled:
            return set()
        return set(self.call(stale_trial_ids, study, retry=False))

    def retry_stale(self, study: optuna.Study, trial_id: int) -> None:
        """Optuna's retry of a heartbeat-stale trial (server storages): its params queued
        again. Journal studies retry in the claim instead."""
        retry = self.optuna.get_heartbeat_stale_trial_callback() if self.heartbeat_enabled \
            else None
        if retry is not None:
            self.call(retry, study, self.optuna.get_trial(trial_id), retry=False)

    def first_beat(self, trial_id: int) -> None:
        """A claimed trial's first heartbeat, before anything else (under the study lock)."""
        if self.heartbeat_enabled:
            self.call(self.optuna.record_heartbeat, trial_id, retry=False)

    @contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Optuna's heartbeat for a trial run by ask-and-tell (Optuna beats only inside
        `optimize`). A beat that fails (the database restarting) is tried at the next
        interval; beats missed for the grace period let another worker fail and retry the
        trial."""
        if not self.heartbeat_enabled:
            yield
            return
        storage, stop = self.optuna, threading.Event()

        def beat() -> None:
            while not stop.wait(storage.get_heartbeat_interval()):
                try:
                    if storage.get_trial(trial_id).state != TrialState.RUNNING:
                        return  # failed by another worker while this process was paused
                    storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001
                    log.debug(f"heartbeat of trial id {trial_id} missed: {describe(exc)}")

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

