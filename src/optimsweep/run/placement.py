"""Where the workers of `--workers` train: one per visible GPU (or K each), each seeing only
its own devices through CUDA_VISIBLE_DEVICES, so four workers on a four-GPU machine use four
GPUs, not `cuda:0` four times. Without CUDA every worker trains on the CPU, as before."""

from __future__ import annotations

from dataclasses import dataclass

from optimsweep.errors import SpecError

AUTO = "auto"
VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Placement:
    """One worker's devices: CUDA_VISIBLE_DEVICES entries (indices, UUIDs or MIG names, as
    the machine gave them); empty on the CPU."""

    devices: tuple[str, ...] = ()

    def environ(self, environ: dict[str, str]) -> dict[str, str]:
        """The worker's environment: its parent's, seeing only its own devices."""
        if not self.devices:
            return dict(environ)
        return {**environ, VISIBLE: ",".join(self.devices)}


def visible_devices(environ: dict[str, str], cuda_count) -> list[str]:
    """The devices this process may use: CUDA_VISIBLE_DEVICES when it is set (what a
    scheduler such as Slurm hands a job), else every device CUDA counts (`cuda_count()`, only
    asked then). As CUDA reads the list, it ends at the first negative index ('-1': none)."""
    listed = environ.get(VISIBLE)
    if listed is None:
        return [str(i) for i in range(cuda_count())]
    devices = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def place(workers: int | str | None, gpus_per_worker: int | None,
          visible: list[str]) -> list[Placement]:
    """Each worker's devices. `workers` None is `auto` where more than one device is visible,
    else 1; `auto` is one worker per `gpus_per_worker` (default 1) devices, or 1 without
    any. N workers with K devices each take N x K distinct devices; N workers with no K
    given take one device each, round robin when there are more workers than devices
    (small trials sharing a GPU)."""
    where = f" ({VISIBLE}={','.join(visible)})" if visible else " (no CUDA device is visible)"
    if gpus_per_worker is not None:
        if gpus_per_worker < 1:
            raise SpecError(f"--gpus-per-worker: {gpus_per_worker} must be >= 1")
        if gpus_per_worker > len(visible):
            raise SpecError(f"--gpus-per-worker: {gpus_per_worker} is more than the "
                            f"{len(visible)} visible devices{where}")
    if workers is None:
        workers = AUTO if len(visible) > 1 else 1
    per = gpus_per_worker or 1
    if workers == AUTO:
        workers = max(1, len(visible) // per)
    if not isinstance(workers, int) or workers < 1:
        raise SpecError(f"--workers: {workers} must be >= 1 or 'auto'")
    if not visible:
        return [Placement()] * workers
    if gpus_per_worker is None:
        return [Placement((visible[i % len(visible)],)) for i in range(workers)]
    if workers * per > len(visible):
        raise SpecError(f"--workers {workers} --gpus-per-worker {per} needs {workers * per} "
                        f"devices, {len(visible)} are visible{where}")
    return [Placement(tuple(visible[i * per:(i + 1) * per])) for i in range(workers)]


def parse_workers(value: str) -> int | str:
    """`--workers`: a count or `auto`."""
    if value == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a count or 'auto'") from None
