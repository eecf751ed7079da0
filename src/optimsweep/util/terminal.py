"""What reaches the terminal: our own lines, not the libraries' logs.

Optuna's info lines, MLflow's and SQLAlchemy's logged tracebacks (they log one when a Ctrl-C
cuts a database session short) and deprecation notices are noise between our one-line
messages; the reason for every failure is on its MLflow run. `--debug` shows them all.
"""

from __future__ import annotations

import logging
import sys
import warnings

from optimsweep.util.urls import redact_text

LIBRARIES = ("mlflow", "alembic", "sqlalchemy", "urllib3")
_library_level = logging.WARNING  # what `quiet` chose; MLflow resets its logger on import


class NoteHandler(logging.Handler):
    """optimsweep's own warnings (repairs, a worker lost) as `note:` lines."""

    def emit(self, record):
        print(f"note: {redact_text(record.getMessage())}", file=sys.stderr)


def quiet(debug: bool = False) -> None:
    import optuna  # here: cli.py imports this module at start; optuna takes 0.5 s to import

    optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.WARNING)
    logger = logging.getLogger("optimsweep")
    if not any(isinstance(h, NoteHandler) for h in logger.handlers):
        logger.addHandler(NoteHandler())
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)  # workers ask it for --debug
    global _library_level
    _library_level = logging.NOTSET if debug else logging.CRITICAL
    quiet_libraries()
    if debug:
        return
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)


def quiet_libraries() -> None:
    """The libraries' loggers at the level `quiet` chose (WARNING if it was never called).
    Called again once MLflow is imported: its import sets its logger to INFO."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(_library_level)
