"""The shared training core: one configuration in, a trained model and its curves out.

`train`, every sweep trial, `export` and `confirm` all call `fit`. It knows nothing about
Optuna or MLflow; callers watch progress (and ask to stop) through `on_epoch`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from optimsweep.data import DEFAULT_VAL_SIZE, TASKS, TRAIN_POOL, Dataset, load_task
from optimsweep.models import MODELS_BY_TASK, build_model

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULERS = ("none", "step", "plateau", "cosine")
DEVICES = ("auto", "cpu", "cuda")
SEED_LIMIT = 2**32  # torch takes more, but numpy (Optuna's samplers) takes seeds below this

# Parameters that only mean something for one optimizer or scheduler: they are logged,
# exported and searched only when their condition holds.
CONDITIONS: dict[str, tuple[str, str]] = {
    "momentum": ("optimizer", "momentum"),
    "nesterov": ("optimizer", "momentum"),
    "beta1": ("optimizer", "adam"),
    "beta2": ("optimizer", "adam"),
    "step_size": ("scheduler", "step"),
    "gamma": ("scheduler", "step"),
    "factor": ("scheduler", "plateau"),
    "patience": ("scheduler", "plateau"),
}


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; the message names the field."""


class DivergedError(RuntimeError):
    """The training loss (or another watched value) became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float, what: str = "loss"):
        where = f"epoch {epoch}, step {step}" if step else f"epoch {epoch}"
        super().__init__(f"training diverged: {what} is {loss} at {where}")
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults are the seed tutorial's setup."""

    task: str = "fashion_mnist"
    model: str = "mlp"
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # optimizer: momentum
    nesterov: bool = False  # optimizer: momentum
    beta1: float = 0.9  # optimizer: adam
    beta2: float = 0.999  # optimizer: adam
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    scheduler: str = "none"
    step_size: int = 5  # scheduler: step, in epochs
    gamma: float = 0.1  # scheduler: step
    factor: float = 0.1  # scheduler: plateau
    patience: int = 2  # scheduler: plateau, in epochs
    seed: int = 0
    device: str = "auto"
    val_size: int | None = None  # None: the task's default (10k images for FashionMNIST)
    split_seed: int = 0  # fixes the train/validation split, separately from `seed`
    train_subset: int | None = None  # keep only the first N training examples (tests)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        _choose("task", self.task, TASKS)
        _choose("model", self.model, MODELS_BY_TASK[self.task])
        _choose("optimizer", self.optimizer, OPTIMIZERS)
        _choose("scheduler", self.scheduler, SCHEDULERS)
        _choose("device", self.device, DEVICES)
        _require("lr", self.lr, self.lr > 0 and math.isfinite(self.lr), "a number > 0")
        _require("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        _require("beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)")
        _require("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)")
        _require("weight_decay", self.weight_decay, self.weight_decay >= 0, "a number >= 0")
        _require("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        _require("epochs", self.epochs, self.epochs >= 1, "an integer >= 1")
        _require("step_size", self.step_size, self.step_size >= 1, "an integer >= 1")
        _require("gamma", self.gamma, 0 < self.gamma <= 1, "in (0, 1]")
        _require("factor", self.factor, 0 < self.factor < 1, "in (0, 1)")
        _require("patience", self.patience, self.patience >= 0, "an integer >= 0")
        for name in ("seed", "split_seed"):
            _require(name, getattr(self, name), 0 <= getattr(self, name) < SEED_LIMIT,
                     f"an integer in [0, {SEED_LIMIT - 1}]")
        if self.val_size is None:  # written out, so exported configs say which split they used
            self.val_size = DEFAULT_VAL_SIZE[self.task]
        pool = TRAIN_POOL[self.task]  # the validation split is carved from these examples
        _require("val_size", self.val_size, 1 <= self.val_size < pool,
                 f"an integer in [1, {pool - 1}]: {self.task} has {pool} training examples "
                 "and at least one must be left to train on")
        if self.train_subset is not None:
            _require("train_subset", self.train_subset, self.train_subset >= 1, "an integer >= 1")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: not a training parameter; allowed: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def is_active(self, name: str) -> bool:
        if name not in CONDITIONS:
            return True
        parent, value = CONDITIONS[name]
        return getattr(self, parent) == value

    def active_params(self) -> dict:
        """Every parameter that affects this run; conditional ones only where they apply."""
        return {k: v for k, v in dataclasses.asdict(self).items() if self.is_active(k)}


CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _choose(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _require(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is out of range; must be {allowed}")


def _coerce(name: str, value, type_name: str):
    """Accept what YAML and the command line hand us: '1e-4' is a float (YAML 1.1 reads it
    as a string), 64.0 is an int; anything else of the wrong type is an error."""
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    base = type_name.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if base == "int":
            if isinstance(value, bool):
                raise TypeError
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise TypeError
            return int(number)
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise ArithmeticError
            return number
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not {_TYPE_WORDS[base]}") from None
    except ArithmeticError:
        raise ConfigError(f"{name}: {value!r} is not a finite number") from None


_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a name"}


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # None for regression
    lr: float  # the learning rate this epoch trained with
    seconds: float


@dataclass
class FitResult:
    model: nn.Module
    history: list[EpochStats] = field(default_factory=list)
    test_loss: float = math.nan
    test_accuracy: float | None = None
    stopped_early: bool = False
    device: str = "cpu"

    @property
    def final(self) -> EpochStats:
        return self.history[-1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; "
                          "choose one of: auto, cpu")
    return torch.device(name)


def load_data(config: TrainConfig) -> Dataset:
    """The dataset `config` trains on: its task and split, on its device."""
    return load_task(config.task, device=resolve_device(config.device), val_size=config.val_size,
                     split_seed=config.split_seed, train_subset=config.train_subset)


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    nesterov = config.nesterov and config.optimizer == "momentum"
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer):
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.factor, patience=config.patience)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def loss_function(task: str) -> nn.Module:
    # The seeds: cross-entropy for the classifier, L1 (mean absolute error) for the line.
    return nn.CrossEntropyLoss() if task == "fashion_mnist" else nn.L1Loss()


def train_epoch(model, loss_fn, optimizer, x, y, batch_size: int, generator, epoch: int) -> float:
    """One pass over (x, y) in shuffled batches; returns the mean batch loss.

    Losses stay on the device until the end of the epoch (no per-step sync); a non-finite one
    is then located exactly and reported.
    """
    model.train()
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device)
    n_batches = math.ceil(n / batch_size)
    losses = torch.empty(n_batches, device=x.device)
    for step in range(n_batches):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = loss_fn(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise DivergedError(epoch, bad + 1, float(losses[bad]))
    return float(losses.mean())


@torch.inference_mode()
def evaluate(model, loss_fn, x, y, batch_size: int = 4096) -> tuple[float, float | None]:
    """Mean loss and, for classifiers, accuracy in [0, 1] over (x, y)."""
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    classify = y.dtype == torch.long
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += loss_fn(out, target) * target.shape[0]
        if classify:
            correct += (out.argmax(1) == target).sum()
    n = x.shape[0]
    return float(total_loss) / n, (int(correct) / n if classify else None)


def fit(
    config: TrainConfig,
    data: Dataset,
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
) -> FitResult:
    """Train `config` on `data`; `on_epoch(stats)` returning True stops training early.

    The same seed gives the same weights, batches and metrics on the same device.
    Raises DivergedError if the training loss becomes NaN or infinite.
    """
    device = resolve_device(config.device)
    data = data.to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(config, optimizer)
    loss_fn = loss_function(config.task)
    generator = torch.Generator().manual_seed(config.seed)
    result = FitResult(model=model, device=str(device))

    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(model, loss_fn, optimizer, data.train_x, data.train_y,
                                 config.batch_size, generator, epoch)
        val_loss, val_accuracy = evaluate(model, loss_fn, data.val_x, data.val_y)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        stats = EpochStats(epoch, train_loss, val_loss, val_accuracy, lr,
                           time.perf_counter() - start)
        result.history.append(stats)
        if on_epoch is not None and on_epoch(stats):
            result.stopped_early = True
            break

    result.test_loss, result.test_accuracy = evaluate(model, loss_fn, data.test_x, data.test_y)
    return result
