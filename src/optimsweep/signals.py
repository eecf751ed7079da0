"""SIGTERM means what Ctrl-C means: stop, close the trial that is running, keep the records.

The handler raises Interrupted wherever the program is, so a long epoch stops at once. Python
drops an exception raised inside a weakref callback or __del__ ("Exception ignored in …"),
so the signal is also remembered, and `check()` at the loop's safe points (each epoch, each
claim, the parent's wait for its workers) raises it again if it was lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the running trial is closed as interrupted."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_on_signals(*, once: bool = False) -> None:
    """Raise Interrupted in the main thread on SIGINT or SIGTERM. With `once`, a second
    signal is ignored, so the first one's clean-up (closing the runs) is not cut short: for
    worker processes, which their parent kills outright if they take too long."""
    global _received
    _received = None

    def handler(signum, frame):
        global _received
        _received = signum
        if once:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    """Ctrl-C and SIGTERM wait until the block is done (they are delivered as it ends), for
    steps a KeyboardInterrupt must not cut in half. Only the main thread receives them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def check() -> None:
    """At a safe point: raise the signal whose Interrupted was dropped, if one was."""
    if _received is not None:
        raise Interrupted(_received)
