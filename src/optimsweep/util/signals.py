"""SIGTERM means what Ctrl-C means: stop, close the trial that is running, keep the records.

The handler raises Interrupted wherever the program is, so a long epoch stops at once, except
inside `held()` blocks: the calls to the stores. A KeyboardInterrupt raised inside SQLite's
commit can leave its connection holding the database's write lock, and every later write of
the process (closing the runs) then waits on it for good. There the signal is noted and
raised as the block ends; a second one does not wait. Python drops an exception raised
inside a weakref callback or __del__ ("Exception ignored in …"), so the signal is also
remembered, and `check()` at the loop's safe points (each epoch, each claim, the parent's
wait for its workers) raises it again if it was lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_received: int | None = None  # the signal this process is stopping for
_deferred: int | None = None  # one that came inside a held() block, raised as it ends
_depth = 0  # held() blocks open in the main thread


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the running trial is closed as interrupted."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _ignore(signum, frame) -> None:
    pass


def stop_on_signals(*, once: bool = False) -> None:
    """Raise Interrupted in the main thread on SIGINT or SIGTERM. With `once`, a second
    signal is ignored, so the first one's clean-up (closing the runs) is not cut short: for
    worker processes, which their parent kills outright if they take too long."""
    global _received, _deferred
    _received = _deferred = None

    def handler(signum, frame):
        global _received, _deferred
        _received = signum
        if once:  # a handler that does nothing, not SIG_IGN: a second signal already
            # pending when this runs would make Python raise "Signal N ignored due to race
            # condition" (Ctrl-C reaches every worker just before its parent's SIGTERM)
            signal.signal(signal.SIGINT, _ignore)
            signal.signal(signal.SIGTERM, _ignore)
        if _depth and _deferred is None:
            _deferred = signum
            return
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    default_hook = sys.unraisablehook

    def unraisable(info):
        if not isinstance(info.exc_value, Interrupted):  # that one, check() raises again
            default_hook(info)

    sys.unraisablehook = unraisable


@contextlib.contextmanager
def held():
    """Ctrl-C and SIGTERM wait until the block is done (they are raised as it ends), for
    steps a KeyboardInterrupt must not cut in half. Python runs signal handlers in the main
    thread only, whichever thread the signal reached; other threads' blocks hold nothing."""
    global _depth, _deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _deferred is not None:
            signum, _deferred = _deferred, None
            raise Interrupted(signum)


def check() -> None:
    """At a safe point: raise the signal whose Interrupted was dropped, if one was."""
    if _received is not None:
        raise Interrupted(_received)
