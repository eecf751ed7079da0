"""The progress bar as a person sees it: `optimsweep sweep` in a real terminal (tmux), its
screen read while the only trial trains and after it ends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from records import DATA
from sweeps import line_sweep

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"),
                                reason="no tmux here (make test installs it)")


class Terminal:
    """A tmux session of its own (its own server socket), 160 x 12."""

    def __init__(self, name: str):
        self.tmux = ["tmux", "-L", name]

    def run(self, command: str) -> None:
        subprocess.run([*self.tmux, "new-session", "-d", "-x", "160", "-y", "12", command],
                       check=True)

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout

    def wait_for(self, text: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never shown; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def test_the_bar_counts_finished_trials_while_the_only_one_trains(tmp_path):
    path = line_sweep(tmp_path, budget={"n_trials": 1, "epochs": 300},
                      search_space={"optimizer": "sgd", "batch_size": 16,
                                    "lr": {"type": "float", "low": 0.01, "high": 0.02}})
    optimsweep = Path(sys.executable).with_name("optimsweep")
    terminal = Terminal(f"optimsweep-test-{os.getpid()}")
    try:
        terminal.run(f"cd {tmp_path} && OPTIMSWEEP_DATA={DATA} {optimsweep} sweep {path}; "
                     "sleep 120")
        training = terminal.wait_for("running: 0 (epoch")
        bar = next(line for line in training.splitlines() if "running: 0 (epoch" in line)
        assert "0/1" in bar and "100%" not in bar, bar
        done = terminal.wait_for("budget 1 of 1 used")
        assert "1/1" in done and "100%" in done, done
    finally:
        terminal.close()
