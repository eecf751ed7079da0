"""SIGTERM means what Ctrl-C means: stop, close the trial that is running, keep the records."""

from __future__ import annotations

import signal


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

    def handler(signum, frame):
        if once:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
