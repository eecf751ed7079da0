"""Every error a user can cause or meet, by what the command line does with it: bad input
(exit 2), a store, a server or a worker that failed (exit 3), an interrupt (128 + signal).
Each prints as one line, without a traceback (`--debug` shows it)."""

from __future__ import annotations

from collections.abc import Iterator

from optimsweep.util.signals import Interrupted  # noqa: F401  (raised by the signal handler)
from optimsweep.util.urls import redact_text


class Expected(Exception):
    """A failure a user can cause or meet: its message is the whole story."""

    exit_code = 1


class BadInput(Expected, ValueError):
    """The sweep file, a config, the command line or the user's code is wrong; the message
    names the file, the key and what is allowed. Raised before anything is created."""

    exit_code = 2


class SpecError(BadInput):
    """The sweep file is invalid."""


class ConfigError(BadInput):
    """A training value is out of range or unknown; the message names the field."""


class UserCodeError(BadInput):
    """An import string can't be resolved or called as the sweep file says."""


class DataError(BadInput):
    """A data factory returned something that can't be trained on; says what and why."""


class DataUnavailable(BadInput):
    """The FashionMNIST files could not be found, installed or downloaded."""


class UsageError(BadInput):
    """A mistake on the command line itself."""


class DivergedError(BadInput, RuntimeError):
    """The training loss (or another watched value) became NaN or infinite: the config's
    own failure (in a sweep, that trial's; in `train`, the command's)."""

    def __init__(self, epoch: int, step: int, loss: float, what: str = "loss"):
        where = f"epoch {epoch}, step {step}" if step else f"epoch {epoch}"
        super().__init__(f"training diverged: {what} is {loss} at {where}")
        self.epoch, self.step, self.loss = epoch, step, loss


class Failed(Expected, RuntimeError):
    """Not the input's fault: a store, a server or a worker."""

    exit_code = 3


class StoreError(Failed):
    """Optuna's storage or MLflow's tracking store can't be read or written. The trial that
    hit it does not use up budget, and the sweep stops with this one line."""


class ServiceError(Failed):
    """A server could not be installed, started or reached; the message says which and why."""


class WorkersFailed(Failed):
    """A worker process ended abnormally; the message says which and what became of its
    trial."""


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


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what caused it, each once: a chain can loop back on itself (an exception
    raised while handling one that is its own context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
