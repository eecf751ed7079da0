"""The whole training state of one configuration at the end of an epoch: enough to go on
training as if it had never stopped (nanoGPT's checkpoint, grown by what a sweep needs).

A checkpoint holds the model's weights, its optimizer's and scheduler's state, every random
stream the core draws from (its batch order, torch's global generator for initialisation and
dropout, CUDA's), the epoch reached, the curve so far, and what the trial was: its config,
its precision, whether it trained fused, and the version of the code that trained it. Tensors
are stored in the model's own layout, so a member of a fused group resumes alone or in another
group. Files are read with `weights_only=True`: a tampered pickle is refused, never run.

`Checkpointer` decides when a member's state is written: each epoch (`every: 0`), or once
`every` seconds of training have passed since the last write, or (`auto`) whenever the time
spent on checkpoints so far plus one more write (its measured cost) stays within `AUTO_SHARE`
of the time trained, whatever the model's size. The state of the last finished epoch is
kept in memory between writes, so an interrupt writes it before the process exits. Where
the file goes is the caller's (`sink`): a run's artifacts, a file beside `train --save`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimsweep.util import values
from optimsweep.util.atomic import write_atomic

FORMAT = 1
AUTO_SHARE = 0.02  # the share of a trial's time `every: auto` lets writing take
# Before the first write is measured, `auto` assumes a write costs this much: a slow store
# (a tracking server across a network), so that short trials never pay for one.
ASSUMED_LATENCY, ASSUMED_BYTES_PER_SECOND = 0.05, 100e6
# Fields that say how a run is carried out (where the code lives, when data streams), not
# what it learns: a worker in another folder resumes a checkpoint whatever they are.
NOT_COMPARED = ("code_dir", "in_memory_mb")


def parse_every(value) -> float | str:
    """`every` as a sweep file or the command line gives it: "auto", or seconds >= 0 (a
    number, or a string that reads as one); ValueError saying what is allowed."""
    if value == "auto":
        return value
    try:
        seconds = values.number(value, float)
    except values.Unfit:
        seconds = -1.0
    if seconds < 0:
        raise ValueError(f"{value!r} is not allowed; choose auto, or seconds >= 0 between "
                         "checkpoints (0: every epoch)")
    return seconds


class Refused(Exception):
    """A checkpoint that must not be resumed from; the message says why, in one line."""


@functools.cache
def code_version() -> str:
    """A fingerprint of the training core's source: a checkpoint written by other training
    code may not continue the same computation. Changes elsewhere (the CLI, the records)
    leave it alone."""
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainingState:
    """One member's state at the end of epoch `epoch` (with R reports per epoch: of report
    `epoch`, maybe within an epoch; its batch order's generator is then as that epoch
    began), its tensors on the CPU."""

    epoch: int
    config: dict  # dataclasses.asdict(TrainConfig)
    precision: str  # as resolved on the device it trained on
    fused: bool  # whether it trained as a member of a larger group
    history: list[dict]  # EpochStats as dicts, epochs 1..epoch
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    rng: dict  # batch_order, torch, cuda (a list, one per device)
    code: str = field(default_factory=code_version)
    user_code: dict = field(default_factory=dict)  # {role: version} of the user's factories
    reports_per_epoch: int = 1  # `epoch` counts reports: R an epoch

    def save(self, path: Path | str) -> None:
        torch.save({"format": FORMAT, **dataclasses.asdict(self)}, path)


def _cpu(value):
    """A deep copy with every tensor contiguous on the CPU (a view of a fused stack would
    otherwise save, and pin, the whole stack)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value


def transpose_optimizer_state(state: dict, flipped: list[bool]) -> dict:
    """An optimizer's state_dict with the 2-D state of the parameters at `flipped` positions
    transposed: between a fused stack's (in, out) layout and the model's (out, in)."""
    out = dict(state, state={})
    for index, param_state in state["state"].items():
        flip = flipped[int(index)]
        out["state"][index] = {k: v.t().contiguous() if flip and isinstance(v, torch.Tensor)
                               and v.dim() == 2 else v for k, v in param_state.items()}
    return out


def rng_state(generator: torch.Generator) -> dict:
    return {"batch_order": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(generator: torch.Generator, rng: dict, *, global_too: bool) -> None:
    """The member's batch order; with `global_too` (a member training alone) also torch's
    global generators, which dropout draws from."""
    generator.set_state(rng["batch_order"])
    if global_too:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and \
                len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])


def capture(**parts) -> TrainingState:
    """A TrainingState from live objects, copied to the CPU (training goes on in them)."""
    return TrainingState(**{k: _cpu(v) for k, v in parts.items()})


def nbytes(value) -> int:
    """The bytes of the tensors in `value` (a TrainingState, or any nesting of them)."""
    if isinstance(value, TrainingState):
        value = vars(value)  # not dataclasses.asdict: that copies every tensor
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0


def _differences(saved: dict, config: dict) -> list[str]:
    return [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in config.items()
            if k not in NOT_COMPARED and saved.get(k) != v]


def load(path: Path | str, config: dict, precision: str, *, user_code: dict | None = None,
         model: torch.nn.Module | None = None, reports_per_epoch: int = 1) -> TrainingState:
    """The checkpoint at `path`, if it continues `config` (a dict of TrainConfig) trained in
    `precision` with the user's code at `user_code` ({role: version}) into `model` (its
    architecture: a model on the meta device will do); raises Refused, saying why, for a
    torn or tampered file, another config, precision, model or version of the code, or a
    curve that does not fit."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torn, truncated, or not ours: all refused)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise Refused(f"unreadable ({type(exc).__name__}{': ' + first if first else ''})"
                      ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise Refused(f"not a checkpoint of format {FORMAT}")
    raw.pop("format")
    try:
        state = TrainingState(**raw)
    except TypeError as exc:
        raise Refused(f"not a checkpoint of format {FORMAT} ({exc})") from None
    if state.code != code_version():
        raise Refused(f"written by another version of the training code ({state.code}, this "
                      f"is {code_version()})")
    if user_code is not None and state.user_code != user_code:
        role = next(r for r in {**state.user_code, **user_code}
                    if state.user_code.get(r) != user_code.get(r))
        raise Refused(f"written by another version of the {role} code "
                      f"({state.user_code.get(role)}, now {user_code.get(role)})")
    differences = _differences(state.config, config)
    if differences:
        raise Refused(f"from another config: {', '.join(differences[:3])}")
    if state.precision != precision:
        raise Refused(f"trained in {state.precision}, this process trains in {precision}")
    if state.reports_per_epoch != reports_per_epoch:
        raise Refused(f"made with {state.reports_per_epoch} reports an epoch, this run makes "
                      f"{reports_per_epoch}")
    if not (1 <= state.epoch < config["epochs"] * reports_per_epoch) or \
            len(state.history) != state.epoch:
        raise Refused(f"its epoch {state.epoch} does not fit a run of {config['epochs']} "
                      "epochs")
    if model is not None:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in state.model.items()}
        if shapes != saved:
            name = next(k for k in sorted({*shapes, *saved}) if shapes.get(k) != saved.get(k))
            raise Refused(f"from another model: {name} is {saved.get(name)} there, "
                          f"{shapes.get(name)} here")
    return state


Sink = Callable[[Path, int], None]  # (file, epoch): store the checkpoint, drop older ones


def file_sink(target: Path) -> Sink:
    """Checkpoints kept in one file, replaced whole (`train --save`)."""
    def sink(path: Path, epoch: int) -> None:
        with open(path, "rb") as source:
            write_atomic(target, lambda fh: shutil.copyfileobj(source, fh))
    return sink


@dataclass
class Checkpointer:
    """When one member's training state is written, and what is written on an interrupt.
    `every`: seconds between writes (0: every epoch), or "auto" (see AUTO_SHARE)."""

    sink: Sink
    every: float | str = "auto"
    pending: TrainingState | None = None  # the last finished epoch, not yet written
    write_seconds: float = 0.0  # all writes so far (capturing included)
    writes: int = 0
    _trained: float = 0.0  # seconds trained, in all
    _since_write: float = 0.0  # seconds trained since the last write
    _last_cost: float | None = None

    def _due(self) -> bool:
        if self.every == "auto":  # all writing (and keeping) so far within AUTO_SHARE
            cost = self._last_cost
            if cost is None:
                cost = ASSUMED_LATENCY + nbytes(self.pending) / ASSUMED_BYTES_PER_SECOND
            return self.write_seconds + cost <= AUTO_SHARE * self._trained
        return self._since_write >= float(self.every)

    def epoch_end(self, state: Callable[[], TrainingState], seconds: float) -> None:
        """A member trained an epoch in `seconds` and goes on: keep its state, and write
        it when due."""
        start = time.perf_counter()
        self._trained += seconds
        self._since_write += seconds
        self.pending = state()
        kept = time.perf_counter()
        self.write_seconds += kept - start  # keeping the state in memory costs too
        if self._due():
            self._write(kept)

    def flush(self) -> None:
        """Write the last finished epoch's state if it was not written yet (on an
        interrupt)."""
        if self.pending is not None:
            self._write(time.perf_counter())

    def _write(self, start: float) -> None:
        state = self.pending  # kept until written: an interrupt in between writes it again
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"epoch-{state.epoch:04d}.pt"
            state.save(path)
            self.sink(path, state.epoch)
        self.pending = None
        self._last_cost = time.perf_counter() - start
        self.write_seconds += self._last_cost
        self.writes += 1
        self._since_write = 0.0

