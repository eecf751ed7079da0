"""A benchmark's figures as the markdown file the docs include (`--results DIR`: DIR/SCRIPT.md,
`--8<-- "results/SCRIPT.md"` in a page), each table under the date, commit and CPU it was
measured on. No torch, no optimsweep: like cpu.py, it reads the machine and git only.

A file is one or more blocks; a block is a provenance line, its tables (each with an optional
caption line; the second and later ones under a short line repeating the date, commit and
CPU) and optional note lines. A benchmark run writes one block, the tables it
printed; a file put together by hand from older runs holds a block per run, each with its own
provenance (`Provenance(...)` with the date, commit and CPU of that run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cpu import cpu

ROOT = Path(__file__).resolve().parents[1]
KEPT = "<!-- kept: not produced by the script -->"


def option(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' `--results DIR`; without it nothing is written."""
    parser.add_argument("--results", type=Path, default=None, metavar="DIR",
                        help="also write DIR/SCRIPT.md: the tables printed, with the date, "
                             "commit and CPU (make's bench targets: docs/results)")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _dirty(results: Path | None) -> bool:
    """Tracked files changed, as `git describe --dirty` counts them, less the results folder
    (`make bench` runs three scripts, each writing its file before the next one starts)."""
    spec = ["."]
    if results is not None:
        try:
            spec.append(":(exclude)" + str(results.resolve().relative_to(ROOT)))
        except ValueError:  # outside the repository
            pass
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", *spec))


def command(script: str | Path, argv: list[str] | None = None) -> str:
    """`python benchmarks/SCRIPT.py ARGS` as this process was started, less --results."""
    args, shown = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--results":
            args[:1] = []
        elif not arg.startswith("--results="):
            shown.append(arg)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *shown])


@dataclass
class Provenance:
    """Where and when a block's figures were measured."""

    date: str                   # YYYY-MM-DD
    commit: str | None          # short hash; None: unknown
    cpu: str                    # "MODEL, N cores (flags: ...)"
    command: str                # what was run
    dirty: bool = False         # the work tree had changes to tracked files

    @classmethod
    def here(cls, command: str, results: Path | None = None) -> Provenance:
        """This run's: today, HEAD, this machine's CPU."""
        model, flags = cpu()
        commit = _git("rev-parse", "--short", "HEAD")
        return cls(date=datetime.date.today().isoformat(), commit=commit or None,
                   cpu=f"{model}, {os.cpu_count()} cores (flags: {flags})", command=command,
                   dirty=bool(commit) and _dirty(results))

    def line(self) -> str:
        if self.commit:
            at = f" at commit {self.commit}" + (" with local changes" if self.dirty else "")
        else:
            at = ", commit unknown,"
        return f"*Measured {self.date}{at} on {self.cpu}; `{self.command}`.*"

    def again(self) -> str:
        """Above a block's later tables: its date, commit and CPU again, short."""
        at = (f" at commit {self.commit}" + (" with local changes" if self.dirty else "")
              if self.commit else ", commit unknown,")
        return f"*Also measured {self.date}{at} on {self.cpu.split(' (flags:')[0]}.*"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    header: list[str]
    rows: list[list[object]]
    caption: str | None = None

    def lines(self) -> list[str]:
        out = [self.caption, ""] if self.caption else []
        out.append("| " + " | ".join(map(_cell, self.header)) + " |")
        out.append("|" + "---|" * len(self.header))
        out += ["| " + " | ".join(map(_cell, row)) + " |" for row in self.rows]
        return out


@dataclass
class Block:
    provenance: Provenance
    tables: list[Table]
    notes: list[str] = field(default_factory=list)
    kept: bool = False          # written by hand: no run of the script gives this table

    def lines(self) -> list[str]:
        out = [KEPT, ""] if self.kept else []
        out += [self.provenance.line(), ""]
        for i, table in enumerate(self.tables):
            if i:  # every table with its date, commit and CPU in sight
                out += [self.provenance.again(), ""]
            out += [*table.lines(), ""]
        for note in self.notes:
            out += [note, ""]
        return out


def markdown(script: str, target: str, blocks: list[Block]) -> str:
    head = (f"<!-- written by `make {target}` (benchmarks/{Path(script).stem}.py); rerun it "
            "to replace this file -->")
    lines = [head, ""]
    for block in blocks:
        lines += block.lines()
    return "\n".join(lines).rstrip("\n") + "\n"


def write(folder: Path, script: str, target: str, blocks: list[Block]) -> Path:
    """FOLDER/SCRIPT.md, replaced whole (a temporary file renamed over it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(script).stem}.md"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(markdown(script, target, blocks))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Results:
    """One run's file: made at the run's start (its date, commit and work tree are the
    start's), written at its end. With folder None (no --results) it writes nothing."""

    def __init__(self, folder: Path | None, script: str, target: str):
        self.folder, self.script, self.target = folder, script, target
        self.provenance = (Provenance.here(command(script), folder)
                           if folder is not None else None)

    def write(self, tables: list[Table], notes: list[str] = ()) -> Path | None:
        if self.folder is None or not tables:
            return None
        path = write(self.folder, self.script, self.target,
                     [Block(self.provenance, tables, list(notes))])
        print(f"wrote {path}")
        return path
