"""The shared training core: configurations in, trained models and their curves out.

`fit_group` trains a group of configurations at once as one batched model (see stack.py);
`fit` is a group of one. `train`, every sweep trial, `export` and `confirm` all go through
it. It knows nothing about Optuna or MLflow; callers watch each member's progress (and ask
it to stop) through its `on_epoch`.

Numerics: on CPU, denormal floats are flushed to zero (numerics.py says why and how).
`precision: bf16` autocasts matrix products to bfloat16 and keeps fp32 master weights,
optimizer state and losses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import optimsweep.core.numerics  # noqa: F401  (denormals flushed before any tensor work)
from optimsweep.core import checkpoint
from optimsweep.core.checkpoint import Checkpointer, TrainingState
from optimsweep.core.data import (
    DEFAULT_VAL_SIZE,
    IN_MEMORY_MB,
    TASKS,
    TRAIN_POOL,
    Dataset,
    StreamingData,
    load_dataset,
)
from optimsweep.core.models import MODELS, MODELS_BY_TASK, build_model
from optimsweep.core.stack import ModelStack
from optimsweep.core.usercode import code_version, is_import_string, resolve
from optimsweep.errors import ConfigError, DivergedError
from optimsweep.util import values

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "plateau", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")
SEED_LIMIT = 2**32  # torch takes more, but numpy (Optuna's samplers) takes seeds below this
# The seeds' losses, and what each says of the task: "classes" (accuracy of the argmax over
# dimension 1 of the output), "binary" (accuracy of logit > 0), or None (the loss says all).
LOSSES: dict[str, tuple[Callable[[], nn.Module], str | None]] = {
    "cross_entropy": (nn.CrossEntropyLoss, "classes"),
    "nll": (nn.NLLLoss, "classes"),
    "bce_with_logits": (nn.BCEWithLogitsLoss, "binary"),
    "mse": (nn.MSELoss, None),
    "l1": (nn.L1Loss, None),
    "smooth_l1": (nn.SmoothL1Loss, None),
    "kl_div": (lambda: nn.KLDivLoss(reduction="batchmean"), None),  # the mean the math means
}
TASK_LOSS = {"fashion_mnist": "cross_entropy", "regression": "l1"}  # the seeds' choices
KWARG_FIELDS = {"model_kwargs": "model.", "data_kwargs": "data."}  # flat in params and files
# Left out of params and config files while at their defaults: they change how a run is
# carried out, not what it learns.
QUIET_DEFAULTS = ("metric", "code_dir", "in_memory_mb")

# Parameters that only mean something for one optimizer or scheduler: they are logged,
# exported and searched only when their condition holds.
CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "momentum": ("optimizer", ("momentum",)),
    "nesterov": ("optimizer", ("momentum",)),
    "beta1": ("optimizer", ("adam", "adamw")),
    "beta2": ("optimizer", ("adam", "adamw")),
    "alpha": ("optimizer", ("rmsprop",)),
    "step_size": ("scheduler", ("step",)),
    "gamma": ("scheduler", ("step",)),
    "factor": ("scheduler", ("plateau",)),
    "patience": ("scheduler", ("plateau",)),
}


# Every field of TrainConfig belongs to one group, declared on the field (`_in`):
#   data:          which data and how it is cut (split, subset, batches)
#   model:         the model, its loss and metric, and where their code is
#   hardware:      where and in what precision it computes
#   optimisation:  the optimizer, its scheduler and their hyperparameters
#   run:           how long it trains and from which seed
# Configs that agree on every field of FUSED_GROUPS can train as one fused group (group_key).
GROUPS = ("data", "model", "hardware", "optimisation", "run")
FUSED_GROUPS = ("data", "model", "hardware")


def _in(group: str, default=dataclasses.MISSING, *, doc: str, choices: tuple = (),
        rule=None, allowed: str = "", **kwargs):
    """A TrainConfig field of `group` (one of GROUPS), with what it means (`doc`) and what it
    may be: one of `choices`, or a value for which `rule` (predicate, words) holds, or
    `allowed` (words only: checked by __post_init__'s own code). The sweep-file reference
    is written from these."""
    if group not in GROUPS:
        raise ValueError(f"{group!r} is not one of {GROUPS}")
    metadata = {"group": group, "doc": doc, "choices": choices, "rule": rule,
                "allowed": allowed or (rule[1] if rule else "")}
    return field(default=default, metadata=metadata, **kwargs)


def _unit(v) -> bool:
    return 0 <= v < 1


IN_UNIT = (_unit, "in [0, 1)")
POSITIVE = (lambda v: v > 0 and math.isfinite(v), "a number > 0")
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
SEED = (lambda v: 0 <= v < SEED_LIMIT, f"an integer in [0, {SEED_LIMIT - 1}]")


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults are the seed tutorial's setup.

    The fields' order is that of params and config files; each field's group is on it."""

    task: str = _in("data", "fashion_mnist", allowed="a built-in task, or your data "
                    "factory's import string (module:function)",
                    doc="the data: a built-in task, or your own (data.factory in a sweep file)")
    model: str = _in("model", "mlp", allowed="a model of the task, or your model factory's "
                     "import string (module:callable)", doc="the model to train")
    model_kwargs: dict = _in("model", default_factory=dict, allowed="keyword arguments",
                             doc="the model factory's arguments; model.NAME in files and params")
    data_kwargs: dict = _in("data", default_factory=dict, allowed="keyword arguments",
                            doc="the data factory's arguments; data.NAME in files and params")
    loss: str | None = _in("model", None, choices=tuple(LOSSES),
                           doc="the loss; unset: the built-in task's own (fashion_mnist: "
                           "cross_entropy, regression: l1)")
    metric: str | None = _in("model", None, allowed="an import string (module:function)",
                             doc="your metric, a function (outputs, targets) -> float, "
                             "logged as val_NAME")
    code_dir: str | None = _in("model", None, allowed="a folder",
                               doc="the folder that makes the import strings importable "
                               "(set from the sweep file's folder)")
    optimizer: str = _in("optimisation", "sgd", choices=OPTIMIZERS,
                         doc="torch.optim's SGD, SGD with momentum, Adam, AdamW or RMSprop")
    lr: float = _in("optimisation", 1e-3, rule=POSITIVE, doc="the learning rate")
    momentum: float = _in("optimisation", 0.9, rule=IN_UNIT,
                          doc="SGD's momentum (optimizer: momentum)")
    nesterov: bool = _in("optimisation", False, allowed="true or false",
                         doc="Nesterov momentum (optimizer: momentum)")
    beta1: float = _in("optimisation", 0.9, rule=IN_UNIT,
                       doc="the decay of the first moment (optimizer: adam, adamw)")
    beta2: float = _in("optimisation", 0.999, rule=IN_UNIT,
                       doc="the decay of the second moment (optimizer: adam, adamw)")
    alpha: float = _in("optimisation", 0.99, rule=IN_UNIT,
                       doc="the smoothing of the squared gradients (optimizer: rmsprop)")
    weight_decay: float = _in("optimisation", 0.0, rule=(lambda v: v >= 0, "a number >= 0"),
                              doc="L2 penalty; decoupled from the gradient for adamw "
                              "(torch's default there is 0.01)")
    batch_size: int = _in("data", 64, rule=AT_LEAST_1, doc="examples per training batch")
    epochs: int = _in("run", 10, rule=AT_LEAST_1,
                      doc="epochs to train (budget.epochs in a sweep file)")
    scheduler: str = _in("optimisation", "none", choices=SCHEDULERS,
                         doc="the learning-rate schedule: torch.optim.lr_scheduler's StepLR, "
                         "ReduceLROnPlateau (on the validation loss) or CosineAnnealingLR "
                         "(over the epochs)")
    step_size: int = _in("optimisation", 5, rule=AT_LEAST_1,
                         doc="epochs between decays (scheduler: step)")
    gamma: float = _in("optimisation", 0.1, rule=(lambda v: 0 < v <= 1, "in (0, 1]"),
                       doc="the decay factor (scheduler: step)")
    factor: float = _in("optimisation", 0.1, rule=(lambda v: 0 < v < 1, "in (0, 1)"),
                        doc="the decay factor (scheduler: plateau)")
    patience: int = _in("optimisation", 2, rule=(lambda v: v >= 0, "an integer >= 0"),
                        doc="epochs without improvement before a decay (scheduler: plateau)")
    seed: int = _in("run", 0, rule=SEED,
                    doc="initial weights, batch order and dropout; a sweep's trials share it")
    device: str = _in("hardware", "auto", choices=DEVICES,
                      doc="auto: CUDA when present, else the CPU")
    precision: str = _in("hardware", "fp32", choices=PRECISIONS,
                         doc="bf16: matrix products autocast to bfloat16 (weights and "
                         "optimizer state stay fp32); auto: bf16 where this machine runs it "
                         "faster (CUDA with bf16, CPUs with AMX or AVX-512 BF16)")
    val_size: int | None = _in("data", None, allowed="an integer >= 1, below the training "
                               "examples", doc="validation examples carved from the training "
                               "set; unset: the task's default (10k for FashionMNIST)")
    split_seed: int = _in("data", 0, rule=SEED,
                          doc="fixes the train/validation split, separately from seed")
    train_subset: int | None = _in("data", None, rule=AT_LEAST_1,
                                   doc="keep only the first N training examples (quick runs)")
    in_memory_mb: float = _in("data", IN_MEMORY_MB, rule=(lambda v: v >= 0, "a number >= 0"),
                              doc="datasets up to this size sit in memory as tensors; larger "
                              "ones stream through a DataLoader")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        for name, value, registry, what in (("task", self.task, TASKS, "module:function"),
                                            ("model", self.model, MODELS, "module:callable")):
            if value not in registry and not is_import_string(value):
                raise ConfigError(f"{name}: {value!r} is not allowed; choose one of: "
                                  f"{', '.join(registry)}, or a factory's import string "
                                  f"({what})")
        if self.task in TASKS and self.model in MODELS:
            _choose("model", self.model, MODELS_BY_TASK[self.task])
        if self.loss is None:
            self.loss = TASK_LOSS.get(self.task)
        if self.loss is None:
            raise ConfigError(f"loss: required with the data factory {self.task}; choose one "
                              f"of: {', '.join(LOSSES)}")
        if self.metric is not None and not is_import_string(self.metric):
            raise ConfigError(f"metric: {self.metric!r} is not an import string "
                              "(module:function)")
        for name in KWARG_FIELDS:
            for key in getattr(self, name):
                if not (isinstance(key, str) and key.isidentifier()):
                    raise ConfigError(f"{KWARG_FIELDS[name]}{key}: not a keyword argument "
                                      "name")
        for f in dataclasses.fields(self):  # the fields' own choices and ranges
            value = getattr(self, f.name)
            if f.metadata["choices"]:
                _choose(f.name, value, f.metadata["choices"])
            elif f.metadata["rule"] and value is not None:
                ok, words = f.metadata["rule"]
                _require(f.name, value, ok(value), words)
        if self.task in TASKS:
            if self.val_size is None:  # written out: exported configs say which split
                self.val_size = DEFAULT_VAL_SIZE[self.task]
            pool = TRAIN_POOL[self.task]  # the validation split is carved from these
            _require("val_size", self.val_size, 1 <= self.val_size < pool,
                     f"an integer in [1, {pool - 1}]: {self.task} has {pool} training "
                     "examples and at least one must be left to train on")
        elif self.val_size is not None:  # a factory's size is known once it has run
            _require("val_size", self.val_size, self.val_size >= 1, "an integer >= 1")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        for name, prefix in KWARG_FIELDS.items():  # "model.hidden: 16" -> model_kwargs
            dotted = {k[len(prefix):]: values.pop(k) for k in list(values)
                      if isinstance(k, str) and k.startswith(prefix)}
            if dotted:
                values[name] = {**(values.get(name) or {}), **dotted}
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
        parent, values = CONDITIONS[name]
        return getattr(self, parent) in values

    def user_code(self) -> dict[str, str]:
        """The user's own factories this config names: {"data"|"model"|"metric": ref}."""
        refs = {"data": self.task if self.task not in TASKS else None,
                "model": self.model if self.model not in MODELS else None,
                "metric": self.metric}
        return {role: ref for role, ref in refs.items() if ref is not None}

    def active_params(self) -> dict:
        """Every parameter that affects this run; conditional ones only where they apply;
        factory arguments flat, as `model.NAME` and `data.NAME`."""
        params = {}
        for k, v in dataclasses.asdict(self).items():
            if k in KWARG_FIELDS:
                params.update({f"{KWARG_FIELDS[k]}{n}": x for n, x in v.items()})
            elif self.is_active(k) and not (k in QUIET_DEFAULTS and v == CONFIG_DEFAULTS[k]):
                params[k] = v
        return params


def _choose(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _require(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is out of range; must be {allowed}")


def _coerce(name: str, value, type_name: str):
    """Accept what YAML and the command line hand us (util/values.py's rules): '1e-4' is a
    float, 64.0 is an int; anything else of the wrong type is an error."""
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    base = type_name.replace(" | None", "")
    try:
        if base == "dict":
            if not isinstance(value, dict):
                raise values.Unfit
            return dict(value)
        if base == "bool":
            return values.truth(value)
        if base in ("int", "float"):
            return values.number(value, int if base == "int" else float)
        if not isinstance(value, str):
            raise values.Unfit
        return value
    except values.Unfit as exc:
        what = str(exc) if base == "float" else f"not {_TYPE_WORDS[base]}"  # or not finite
        raise ConfigError(f"{name}: {value!r} is {what}") from None


_TYPE_WORDS = {**values.WORDS, "str": "a name", "dict": "a mapping of keyword arguments"}
CONFIG_DEFAULTS = dataclasses.asdict(TrainConfig())


@dataclass
class EpochStats:
    """One report of a member's progress: at the end of each epoch, or of each 1/R of one
    with `reports_per_epoch` R (then `epoch` counts reports, and `epochs` says how many
    epochs that is)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # None where the loss is not a classifier's
    lr: float  # the learning rate this epoch trained with
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # val_<metric>: the user's metric
    reports_per_epoch: int = 1

    @property
    def epochs(self) -> float:
        """Epochs trained when this report was made."""
        return self.epoch / self.reports_per_epoch

    def value(self, metric: str) -> float:
        """The value of `metric` (val_loss, val_accuracy or val_<user metric>) this epoch."""
        return self.extra[metric] if metric in self.extra else getattr(self, metric)


@dataclass
class FitResult:
    model: nn.Module
    history: list[EpochStats] = field(default_factory=list)
    test_loss: float = math.nan
    test_accuracy: float | None = None
    test_extra: dict[str, float] = field(default_factory=dict)  # test_<user metric>
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


def load_data(config: TrainConfig) -> Dataset | StreamingData:
    """The data `config` trains on: its factory's, split as it says, on its device."""
    return load_dataset(config.task, config.data_kwargs, code_dir=config.code_dir,
                        device=resolve_device(config.device), val_size=config.val_size,
                        split_seed=config.split_seed, train_subset=config.train_subset,
                        in_memory_mb=config.in_memory_mb)


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    # torch's fused kernels: one pass over each tensor per step instead of one per operation
    # (Adam's step takes 0.23 ms instead of 0.83 ms for the tutorial MLP on CPU).
    if config.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return adam(params, lr=config.lr, betas=(config.beta1, config.beta2),
                    weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "rmsprop":  # torch has no fused RMSprop kernel
        return torch.optim.RMSprop(params, lr=config.lr, alpha=config.alpha,
                                   weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    nesterov = config.nesterov and config.optimizer == "momentum"
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=config.weight_decay, fused=True)


def build_scheduler(config: TrainConfig, optimizer):
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.factor, patience=config.patience)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def metric_name(ref: str) -> str:
    """"my_metrics:f1" -> "f1": logged as val_f1 and test_f1."""
    return ref.split(":")[1].split(".")[-1]


def fields_of(*groups: str) -> tuple[str, ...]:
    """The names of TrainConfig's fields in `groups`, in the fields' order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig)
                 if f.metadata["group"] in groups)


GROUP_KEY_FIELDS = fields_of(*FUSED_GROUPS)


def group_key(config: TrainConfig) -> tuple:
    """Configurations with the same key can be trained as one fused group: the same model
    (architecture included) and data, cut into the same number of batches of the same
    shape, scored the same way, on the same hardware: every field of FUSED_GROUPS."""
    return tuple(repr(sorted(value.items())) if isinstance(value, dict) else value
                 for value in (getattr(config, name) for name in GROUP_KEY_FIELDS))


def default_fuse(device: torch.device) -> int:
    """How many trials a sweep trains at once when its file says `fuse: auto`, from
    `make bench` (docs/benchmarks.md)."""
    return 8 if device.type == "cuda" else 1


def cpu_has_bf16() -> bool:
    """bf16 matrix instructions: AMX tiles (Intel) or AVX-512 BF16 dot products (Intel,
    AMD Zen 4); without them bf16 is emulated, and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 only where `make bench` measured it faster: CUDA GPUs with bf16, and
    CPUs with bf16 matrix instructions. Elsewhere fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _member_losses(loss_fn, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K, batch, ...) outputs and targets -> the K members' mean losses, computed in fp32."""
    out = out.float()
    if out.shape[0] == 1:
        return loss_fn(out[0], target[0]).unsqueeze(0)
    return torch.vmap(loss_fn)(out, target)


@dataclass
class _Member:
    """One configuration of a group, with everything it trains with of its own."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator  # its batch order
    on_epoch: Callable[[EpochStats], bool | None] | None
    result: FitResult
    checkpointer: Checkpointer | None = None
    step: int = 0  # reports made (those of the checkpoint it resumed from included)
    order: torch.Tensor | None = None  # this epoch's batch order, while it is under way
    epoch_rng: torch.Tensor | None = None  # the batch order's generator as the epoch began


def part_bounds(n: int, batch_size: int, parts: int) -> list[int]:
    """Where an epoch of `n` examples is cut for `parts` reports: offsets into its batch
    order at whole batches, the batches shared out as evenly as they go."""
    batches = math.ceil(n / batch_size)
    if parts > batches:
        raise ConfigError(f"budget.report_every: {parts} reports an epoch, but an epoch has "
                          f"only {batches} batches of {batch_size}; report less often")
    return [min(n, round(i * batches / parts) * batch_size) for i in range(parts + 1)]


def _train_part(stack: ModelStack, optimizers: list, orders: torch.Tensor, loss_fn, data,
                batch_size: int, precision: str) -> torch.Tensor:
    """The batches of `orders` ((K, m) rows of each member's batch order: a whole epoch, or
    a part of one) for every member; returns the (batches, K) losses. They stay on the
    device until the part ends (no per-step sync)."""
    stack.train()
    losses = torch.empty(math.ceil(orders.shape[1] / batch_size), len(optimizers),
                         device=data.device)
    for step, (x, y) in enumerate(data.train_batches(orders, batch_size)):
        with _autocast(data.device, precision):
            out = stack.forward(x)
        loss = _member_losses(loss_fn, out, y)
        stack.zero_grad()
        loss.sum().backward()  # members share no weights: each gets its own loss's gradient
        stack.share_grads()
        for optimizer in optimizers:
            optimizer.step()
        losses[step] = loss.detach()
    return losses


@dataclass
class _Scoring:
    """How outputs are scored: the loss, what kind of task it says, the user's metric."""

    loss_fn: nn.Module
    kind: str | None  # see LOSSES
    metric: Callable | None = None
    metric_name: str = ""

    @classmethod
    def of(cls, config: TrainConfig) -> _Scoring:
        fn, kind = LOSSES[config.loss]
        metric = resolve(config.metric, config.code_dir) if config.metric else None
        return cls(fn(), kind, metric, metric_name(config.metric) if metric else "")

    def correct(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(K, batch, ...) outputs -> each member's count of correct predictions."""
        if self.kind == "classes":
            if target.is_floating_point():  # class probabilities
                target = target.argmax(1)
            hits = out.argmax(2) == target
        else:
            hits = (out > 0) == (target > 0.5)
        return hits.flatten(1).sum(1)


@torch.inference_mode()
def _evaluate(stack: ModelStack, scoring: _Scoring, data, split: str,
              precision: str) -> list[tuple[float, float | None, dict]]:
    """Each member's mean loss, accuracy in [0, 1] (classification losses) and user metric
    over the data's `split` ("val" or "test")."""
    stack.train(False)
    k = len(stack)
    total_loss = torch.zeros(k, device=data.device)
    correct = torch.zeros(k, device=data.device, dtype=torch.long)
    n = targets = 0
    outputs, kept = [], []
    for x, target in data.eval_batches(split):
        with _autocast(data.device, precision):
            out = stack.forward_shared(x)
        total_loss += _member_losses(scoring.loss_fn, out,
                                     target.expand(k, *target.shape)) * target.shape[0]
        n += target.shape[0]
        if scoring.kind is not None:
            correct += scoring.correct(out, target)
            targets += target.numel() // (target.shape[1] if scoring.kind == "classes" and
                                          target.is_floating_point() else 1)
        if scoring.metric is not None:
            outputs.append(out.float())
            kept.append(target)
    extra = [{} for _ in range(k)]
    if scoring.metric is not None:
        out, target = torch.cat(outputs, 1), torch.cat(kept)
        for i in range(k):
            extra[i][f"{split}_{scoring.metric_name}"] = float(scoring.metric(out[i], target))
    return [(float(total_loss[i]) / n,
             int(correct[i]) / targets if scoring.kind is not None else None, extra[i])
            for i in range(k)]


def _diverged(losses: torch.Tensor, epoch: int) -> DivergedError | None:
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return None
    bad = int((~finite).nonzero()[0])
    return DivergedError(epoch, bad + 1, float(losses[bad]))


def _end_of_epoch(member: _Member, stats: EpochStats, state: Callable[[], TrainingState]
                  ) -> bool:
    """At an epoch's end its scheduler steps; at every report the member's state is kept
    (checkpointer) and its caller told; True when it leaves the group. The state is kept
    before the caller hears of the report: whoever sees one can count on its state
    surviving an interrupt."""
    scheduler = member.scheduler
    if stats.epoch % stats.reports_per_epoch:
        pass  # within an epoch: schedulers count epochs
    elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(stats.val_loss)
    elif scheduler is not None:
        scheduler.step()
    member.result.history.append(stats)
    last = stats.epoch >= member.config.epochs * stats.reports_per_epoch
    if member.checkpointer is not None and not last:
        member.checkpointer.epoch_end(state, stats.seconds)
    if member.on_epoch is not None and member.on_epoch(stats):
        member.result.stopped_early = True
        return True
    return last


def fit_group(
    configs: list[TrainConfig],
    data: Dataset,
    on_epoch: list[Callable[[EpochStats], bool | None] | None] | None = None,
    *,
    resume: list[TrainingState | None] | None = None,
    checkpoints: list[Checkpointer | None] | None = None,
    reports_per_epoch: int = 1,
) -> list[FitResult | Exception]:
    """Train every config of a group at once as one batched model; for each, its result or
    the exception that ended it (diverged, or raised by its `on_epoch`).

    Every member has its own seed (initial weights and batch order), optimizer, scheduler
    and `on_epoch(stats)`, which returning True stops that member early (pruned). A member
    that stops, finishes its epochs or fails leaves the group; the others go on. A member
    ends with what its config gives trained alone, up to float rounding of batched matrix
    products. Ctrl-C (any BaseException) ends the whole group at once, after each member's
    checkpointer has written the last epoch it finished.

    `resume[k]`: a checkpoint (checkpoint.load) member k continues from, its history
    included; it trains only the epochs left. `checkpoints[k]`: when and where member k's
    state is written at the end of each epoch it goes on from.

    `reports_per_epoch` R > 1: each epoch is cut into R parts of whole batches, and after
    each part the whole validation split is measured and reported (stats.epoch counts
    reports); a member can stop, and resume from a checkpoint, between parts. The batches,
    and so the trained weights, are those of R = 1.
    """
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ConfigError("a fused group needs one task, model, batch_size, device, precision "
                          f"and data split; got {len(keys)} different ones")
    first = configs[0]
    device = resolve_device(first.device)
    precision = resolve_precision(first.precision, device)
    data = data.to(device)
    scoring = _Scoring.of(first)
    callbacks = on_epoch or [None] * len(configs)
    resume = resume or [None] * len(configs)
    checkpoints = checkpoints or [None] * len(configs)
    models = []
    for config, state in zip(configs, resume, strict=True):
        torch.manual_seed(config.seed)  # its initial weights: those it gets alone
        model = build_model(config.model, config.model_kwargs, config.code_dir)
        if state is not None:
            model.load_state_dict(state.model)
        models.append(model.to(device))
    phases = {state.epoch % reports_per_epoch if state else 0 for state in resume}
    if len(configs) > 1 and (data.streaming or len(phases) > 1 or any(
            next(iter(m.buffers()), None) is not None for m in models)):
        # Streamed batches can't be cut K ways at once, parts of an epoch only stack when
        # they are the same part, and buffers (BatchNorm statistics) can't be stacked:
        # these members train one after another.
        return [fit_group([c], data, [cb], resume=[r], checkpoints=[cp],
                          reports_per_epoch=reports_per_epoch)[0]
                for c, cb, r, cp in zip(configs, callbacks, resume, checkpoints, strict=True)]
    bounds = part_bounds(data.sizes[0], first.batch_size, reports_per_epoch)
    stack = ModelStack(models)
    members = []
    for k, (config, callback) in enumerate(zip(configs, callbacks, strict=True)):
        optimizer = build_optimizer(config, stack.optimizer_params(k))
        member = _Member(config, models[k], optimizer, build_scheduler(config, optimizer),
                         torch.Generator().manual_seed(config.seed), callback,
                         FitResult(model=models[k], device=str(device)), checkpoints[k])
        if resume[k] is not None:
            _restore(member, resume[k], stack, alone=len(configs) == 1)
        members.append(member)
    outcomes: dict[int, FitResult | Exception] = {}
    live = list(range(len(members)))  # positions in `members`, in the stack's order
    try:
        while live:
            group = [members[i] for i in live]
            start = time.perf_counter()
            lrs = [m.optimizer.param_groups[0]["lr"] for m in group]
            for m in group:
                if m.order is None:  # an epoch begins: its batch order, in each member's own
                    m.epoch_rng = m.generator.get_state()
                    m.order = torch.randperm(data.sizes[0], generator=m.generator)
            part = group[0].step % reports_per_epoch  # the same in every member (phases)
            losses = _train_part(stack, [m.optimizer for m in group],
                                 torch.stack([m.order[bounds[part]:bounds[part + 1]]
                                              for m in group]),
                                 scoring.loss_fn, data, first.batch_size, precision)
            validation = _evaluate(stack, scoring, data, "val", precision)
            share = (time.perf_counter() - start) / len(group)  # each member's part
            leaving: dict[int, Exception | None] = {}
            for k, member in enumerate(group):
                member.step += 1
                if member.step % reports_per_epoch == 0:
                    member.order = None
                try:
                    problem = _diverged(losses[:, k], -(-member.step // reports_per_epoch))
                    if problem is not None:
                        raise problem
                    val_loss, val_accuracy, extra = validation[k]
                    stats = EpochStats(member.step, float(losses[:, k].mean()), val_loss,
                                       val_accuracy, lrs[k], share, extra, reports_per_epoch)
                    if _end_of_epoch(member, stats, functools.partial(
                            _state, member, stack, k, precision, reports_per_epoch)):
                        leaving[k] = None
                except Exception as exc:  # noqa: BLE001  (this member's end, not the group's)
                    leaving[k] = exc
            if not leaving:
                continue
            stack.remove([k for k in range(len(group)) if k not in leaving])
            for k, problem in leaving.items():
                member = group[k]
                if problem is None:
                    result = member.result
                    result.test_loss, result.test_accuracy, result.test_extra = _evaluate(
                        ModelStack([member.model]), scoring, data, "test", precision)[0]
                outcomes[live[k]] = member.result if problem is None else problem
            live = [i for k, i in enumerate(live) if k not in leaving]
    except BaseException:
        # Interrupted (or the whole group failed): what each member finished is kept.
        for i in live:
            if members[i].checkpointer is not None:
                try:
                    members[i].checkpointer.flush()
                except Exception:  # noqa: BLE001  (lost with its store: the reason the
                    pass  # group stopped is what goes on up)
        raise
    return [outcomes[i] for i in range(len(members))]


def _state(member: _Member, stack: ModelStack, k: int, precision: str,
           reports_per_epoch: int) -> TrainingState:
    """Member `k` of the stack's whole training state, in the model's own layout."""
    optimizer = member.optimizer.state_dict()
    if stack.fused:
        optimizer = checkpoint.transpose_optimizer_state(optimizer, stack.flipped())
    rng = checkpoint.rng_state(member.generator)
    if member.order is not None:  # within an epoch: its order is drawn again on resume
        rng["batch_order"] = member.epoch_rng
    return checkpoint.capture(
        epoch=member.step, config=dataclasses.asdict(member.config), precision=precision,
        fused=stack.fused, history=[dataclasses.asdict(s) for s in member.result.history],
        model=member.model.state_dict(), optimizer=optimizer,
        scheduler=member.scheduler.state_dict() if member.scheduler is not None else None,
        rng=rng, user_code=user_code_versions(member.config),
        reports_per_epoch=reports_per_epoch)


def user_code_versions(config: TrainConfig) -> dict[str, str]:
    """{role: version} of the user's factories the config names (checkpoints carry it)."""
    return {role: code_version(ref, config.code_dir) for role, ref in config.user_code().items()}


def load_checkpoint(path, config: TrainConfig, reports_per_epoch: int = 1) -> TrainingState:
    """The checkpoint at `path` if `config` can go on from it here: same config, precision
    (as resolved on this machine), model architecture, code and reports per epoch; else
    checkpoint.Refused."""
    precision = resolve_precision(config.precision, resolve_device(config.device))
    try:
        with torch.device("meta"):  # the architecture only, no memory
            model = build_model(config.model, config.model_kwargs, config.code_dir)
    except Exception:  # noqa: BLE001  (a factory that can't build there: the shapes are
        model = None  # checked as the weights load)
    return checkpoint.load(path, dataclasses.asdict(config), precision,
                           user_code=user_code_versions(config), model=model,
                           reports_per_epoch=reports_per_epoch)


def _restore(member: _Member, state: TrainingState, stack: ModelStack, *, alone: bool) -> None:
    """Put a member back where its checkpoint left it (its weights are already loaded)."""
    optimizer = state.optimizer
    if stack.fused:
        optimizer = checkpoint.transpose_optimizer_state(optimizer, stack.flipped())
    member.optimizer.load_state_dict(optimizer)
    if member.scheduler is not None:
        member.scheduler.load_state_dict(state.scheduler)
    checkpoint.restore_rng(member.generator, state.rng, global_too=alone)
    member.result.history = [EpochStats(**s) for s in state.history]
    member.step = state.epoch  # within an epoch, the generator is back at its start


def fit(
    config: TrainConfig,
    data: Dataset,
    on_epoch: Callable[[EpochStats], bool | None] | None = None,
    *,
    resume: TrainingState | None = None,
    checkpointer: Checkpointer | None = None,
) -> FitResult:
    """Train `config` on `data` (a group of one); `on_epoch(stats)` returning True stops
    training early.

    The same seed gives the same weights, batches and metrics on the same device.
    Raises DivergedError if the training loss becomes NaN or infinite, and whatever
    `on_epoch` raises.
    """
    outcome = fit_group([config], data, [on_epoch], resume=[resume],
                        checkpoints=[checkpointer])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
