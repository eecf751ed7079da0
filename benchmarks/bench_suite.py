"""The test suite on slow cores, side by side with an earlier revision's (`make bench-suite`).

The suite's time target is set on the slowest machine seen, a 2-core AMD EPYC with AVX2 only,
where the suite at e963250 took 818 s (13 min 38 s, in one process, as its Makefile ran it).
No such machine is at hand, so this script makes the cores here slow: one busy loop pinned to
each core at the same priority as everything else, so that a process that runs shares its
core half and half with the loop (each core about 2x slower), while sleeps, time-outs and
waits for a server take the time they take. With --avx2, torch's kernels, MKL and oneDNN are
held to AVX2 too, as on that EPYC.

It checks BASE out in a temporary worktree and runs its suite and this checkout's, alternated
A B B A (this machine drifts over minutes), each as its Makefile ran it (BASE in one process,
this checkout in `-n auto` workers), with this checkout's virtual environment. For each run:
the wall time, the busy loops' CPU seconds (about half of the machine while the suite runs),
and how often more of the suite's processes were runnable than there are cores (then the
loops' equal share lets the suite run faster than on really slow cores). Then the ratio of
the medians, and that ratio times the reference's seconds: the figure it puts on the
reference machine. The emulation takes the slow machine as two cores of its own each; two
hyperthreads of one core would be slower. With --results DIR the tables are also written to
DIR/bench_suite.md with the date, commit and CPU (`make bench-suite`: docs/results).

Usage: python benchmarks/bench_suite.py [--base e963250] [--reference-seconds 818]
       [--order ABBA] [--avx2] [--no-slow-cores] [--results DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import results
from cpu import cpu_line

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SlowCores:
    """One busy loop pinned to each core, for as long as the block runs."""

    def __init__(self, on: bool):
        self.on, self.loops = on, []

    def __enter__(self):
        if self.on:
            for core in sorted(os.sched_getaffinity(0)):
                loop = subprocess.Popen(["sh", "-c", "while :; do :; done"])
                os.sched_setaffinity(loop.pid, {core})
                self.loops.append(loop)
        return self

    def cpu(self) -> float:
        return sum(cpu_seconds(loop.pid) for loop in self.loops)

    def __exit__(self, *exc):
        for loop in self.loops:
            loop.kill()
            loop.wait()


class Runnable:
    """Samples how many of the suite's processes are runnable, ten times a second."""

    def __init__(self, others: int):
        self.others, self.counts, self.done = others, [], threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.done.wait(0.1):
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running"):  # less the loops and this sampler
                    self.counts.append(max(0, int(line.split()[1]) - self.others - 1))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def over(self, cores: int) -> float:
        return sum(c > cores for c in self.counts) / max(1, len(self.counts))


def run_suite(tree: Path, args: list[str], env: dict, log: Path, slow: bool) -> dict:
    cores = len(os.sched_getaffinity(0))
    with SlowCores(slow) as loops:
        time.sleep(1)  # the loops running before the suite starts
        with Runnable(len(loops.loops)) as runnable, log.open("w") as out:
            loops_before, start = loops.cpu(), time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                                   "-q", *args], cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                  env={**env, "PYTHONPATH": str(tree / "src")})
            wall = time.perf_counter() - start
            loops_cpu = loops.cpu() - loops_before
    last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    return {"rc": done.returncode, "wall": wall, "loops_cpu": loops_cpu,
            "over": runnable.over(cores), "summary": last[0].strip("= ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="e963250", help="the earlier revision (A)")
    parser.add_argument("--base-args", default="", help="its pytest arguments (one process)")
    parser.add_argument("--args", default="-n auto", help="this checkout's pytest arguments")
    parser.add_argument("--reference-seconds", type=float, default=818.0,
                        help="BASE's suite on the reference machine (e963250: 818 s)")
    parser.add_argument("--order", default="ABBA")
    parser.add_argument("--avx2", action="store_true", help="torch, MKL, oneDNN at AVX2")
    parser.add_argument("--no-slow-cores", dest="slow", action="store_false")
    results.option(parser)
    args = parser.parse_args()
    out = results.Results(args.results, __file__, "bench-suite")

    print(cpu_line())
    print(f"slow cores: {'a busy loop on each core' if args.slow else 'off'}; "
          f"instruction sets: {'AVX2 (' + ', '.join(AVX2) + ')' if args.avx2 else 'all'}")
    env = {**os.environ, "CI": os.environ.get("CI") or "1", **(AVX2 if args.avx2 else {})}
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(base), args.base],
                       cwd=ROOT, check=True)
        try:
            (base / "data").symlink_to((ROOT / "data").resolve())
            trees = {"A": (base, args.base_args.split(), args.base),
                     "B": (ROOT, args.args.split(), f"{rev} (this checkout)")}
            for label, (_, _, name) in trees.items():
                print(f"{label}: {name}, pytest {' '.join(trees[label][1]) or '(one process)'}")
            walls: dict[str, list[float]] = {"A": [], "B": []}
            each = []
            for k, label in enumerate(args.order):
                tree, pytest_args, name = trees[label]
                r = run_suite(tree, pytest_args, env, Path(tmp) / f"{k}{label}.log", args.slow)
                walls[label].append(r["wall"])
                each.append([k + 1, f"{label}: {name}", f"{r['wall']:.1f} s",
                             f"{r['loops_cpu']:.1f}", f"{r['over']:.1%}",
                             f"rc {r['rc']}, {r['summary']}"])
                print(f"  {label} {r['wall']:7.1f} s  rc {r['rc']}  busy loops "
                      f"{r['loops_cpu']:6.1f} CPU s  more runnable than cores "
                      f"{r['over']:5.1%}  {r['summary']}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    if walls["A"] and walls["B"]:
        a, b = statistics.median(walls["A"]), statistics.median(walls["B"])
        print(f"A here {a:.0f} s against {args.reference_seconds:.0f} s on the reference "
              f"machine: {args.reference_seconds / a:.2f}x slower there")
        print(f"B / A: {b / a:.3f}x (medians); at A's {args.reference_seconds:.0f} s there, "
              f"B would take about {b / a * args.reference_seconds:.0f} s")
        cores = ("slow (a busy loop on each core)" if args.slow else "plain") + (
            ", torch, MKL and oneDNN at AVX2" if args.avx2 else "")
        out.write([
            results.Table(
                ["cores", f"{args.base}'s suite (A)", "this suite (B)", "B / A (medians)",
                 f"B where A took {args.reference_seconds:.0f} s"],
                [[cores, ", ".join(f"{w:.1f}" for w in walls["A"]) + " s",
                  ", ".join(f"{w:.1f}" for w in walls["B"]) + " s", f"{b / a:.3f}x",
                  f"about {b / a * args.reference_seconds:.0f} s"]],
                f"Wall seconds of each run, A ({args.base}, pytest "
                f"{args.base_args or 'in one process'}) and B (this checkout, pytest "
                f"{args.args}) alternated {args.order}; the ratio carried over to A's "
                f"{args.reference_seconds:.0f} s on the reference machine."),
            results.Table(["run", "suite", "wall", "busy loops, CPU s",
                           "more runnable than cores", "pytest"], each)])


if __name__ == "__main__":
    main()
