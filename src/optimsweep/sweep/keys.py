"""The sweep file's keys: each one's type, default, allowed values and meaning.

The parser (spec.py) takes the keys it accepts from this table, and the reference in the
docs is written from it: a key the parser knows has its text here, or the package does not
import (`Key` requires it).
"""

from __future__ import annotations

from dataclasses import dataclass

from optimsweep.core.data import TASKS
from optimsweep.core.models import MODELS
from optimsweep.core.train import LOSSES
from optimsweep.records.storage import DEFAULT_STORAGE, Resilience
from optimsweep.records.tracking import DEFAULT_TRACKING_URI
from optimsweep.sweep.samplers import PRUNERS, SAMPLERS

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")
MAX_FUSE = 64
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "postgresql+psycopg")
PARAM_TYPES = ("float", "int", "categorical")
_RESILIENCE = Resilience()


@dataclass(frozen=True)
class Key:
    """One key of a sweep file; `name` is its path (budget.epochs)."""

    name: str
    type: str
    default: str
    allowed: str
    meaning: str

    def __post_init__(self):
        for attribute in ("type", "meaning"):
            if not getattr(self, attribute).strip():
                raise ValueError(f"sweep-file key {self.name}: its {attribute} is empty")

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]


def _names(values) -> str:
    return ", ".join(map(str, values))


KEYS = (
    Key("name", "string", "the file's name without .yaml",
        "1 to 100 letters, digits, '.', '_' or '-'",
        "names the study, its MLflow experiment, its registered model and its folder under "
        "exports/"),
    Key("description", "string", "empty", "any text", "logged with the study's parent run"),
    Key("task", "string", "fashion_mnist", _names(TASKS),
        "a built-in task; your own data goes under data.factory instead"),
    Key("model", "string or mapping", "the task's first model",
        f"{_names(MODELS)}, an import string (module:callable), or a mapping with factory "
        "and kwargs", "the model every trial trains"),
    Key("model.factory", "import string", "required in the mapping form", "module:callable",
        "a function or class that returns an nn.Module"),
    Key("model.kwargs", "mapping", "none", "the factory's keyword arguments",
        "arguments every trial passes; search one as model.NAME in search_space"),
    Key("loss", "string", "the task's own (cross_entropy, l1)", _names(LOSSES),
        "the loss trained on; required with data.factory"),
    Key("metric", "string", "val_accuracy with a classification loss, else val_loss",
        f"{_names(METRICS)}, or an import string of a function (outputs, targets) -> float",
        "what trials are compared on: a validation figure, never the test set"),
    Key("direction", "string", "the metric's own (val_accuracy: maximize)", _names(DIRECTIONS),
        "whether a larger metric is better"),
    Key("seed", "integer", "0", "an integer in [0, 2^32 - 1]",
        "the sampler's seed and every trial's training seed"),
    Key("sampler", "string or mapping", "tpe", f"{_names(SAMPLERS)}, or a mapping with name "
        "and the sampler's options", "Optuna's sampler; its options are listed below"),
    Key("sampler.name", "string", "tpe", _names(SAMPLERS), "which Optuna sampler"),
    Key("pruner", "string or mapping", "median", f"{_names(PRUNERS)}, or a mapping with name "
        "and the pruner's options", "what stops (or, with asha, pauses) trials early"),
    Key("pruner.name", "string", "median", _names(PRUNERS),
        "which pruner; asha is successive halving that pauses and promotes"),
    Key("budget", "mapping", "see its keys", "n_trials, epochs, timeout, report_every",
        "how much the study may spend"),
    Key("budget.n_trials", "integer > 0", "20", "an integer > 0",
        "trials the study holds in all, over every worker and every resume"),
    Key("budget.epochs", "integer > 0", "10", "an integer > 0", "epochs each trial trains"),
    Key("budget.timeout", "number > 0", "none", "seconds",
        "stop claiming new trials after this long, per `sweep` command"),
    Key("budget.report_every", "number", "1", "1, or a fraction 1/R of an epoch (0.5, 0.25)",
        "epochs between reports to the pruner: below 1, rungs fall within an epoch"),
    Key("storage", "string", f"{DEFAULT_STORAGE} (OPTIMSWEEP_STORAGE overrides)",
        f"a journal file path, or a URL: {_names(STORAGE_SCHEMES)}",
        "Optuna's storage: PostgreSQL for workers on many machines"),
    Key("tracking_uri", "string", f"{DEFAULT_TRACKING_URI} (MLFLOW_TRACKING_URI overrides)",
        f"a URL: {_names(TRACKING_SCHEMES)}", "the MLflow tracking store or server"),
    Key("data", "mapping", "see its keys", "factory, kwargs, val_size, split_seed, "
        "train_subset, in_memory_mb", "your own data, and how any data is split"),
    Key("data.factory", "import string", "none (a built-in task)", "module:function",
        "returns your (train, test) datasets; the validation split is carved from train"),
    Key("data.kwargs", "mapping", "none", "the factory's keyword arguments",
        "arguments for data.factory"),
    Key("data.val_size", "integer", "the task's (10000 for FashionMNIST)",
        "an integer >= 1, below the training examples",
        "validation examples carved from the training set: trials are selected on them"),
    Key("data.split_seed", "integer", "0", "an integer in [0, 2^32 - 1]",
        "fixes which examples are held out for validation"),
    Key("data.train_subset", "integer", "none (all)", "an integer >= 1",
        "train on the first N examples only (quick runs)"),
    Key("data.in_memory_mb", "number", "1024", "a number >= 0",
        "data up to this size sits in memory as tensors; larger streams from a DataLoader"),
    Key("fixed", "mapping", "none", "training values (below), or model.NAME",
        "values every trial uses, outside the search"),
    Key("search_space", "mapping", "required", "training values (below), or model.NAME; "
        "each a range, a list of choices or a fixed value", "what the sampler searches"),
    Key("search_space.NAME.type", "string", "required", _names(PARAM_TYPES),
        "a range of numbers, or a list of choices"),
    Key("search_space.NAME.low", "number", "required for a range", "below high",
        "the range's lower end"),
    Key("search_space.NAME.high", "number", "required for a range", "above low",
        "the range's upper end"),
    Key("search_space.NAME.log", "boolean", "false", "true, false",
        "sample on a log scale (low > 0)"),
    Key("search_space.NAME.step", "number > 0", "none (int: 1)", "a number > 0",
        "the spacing of a discrete range; not with a float log range"),
    Key("search_space.NAME.choices", "list", "required for categorical",
        "values of the parameter, none repeated", "what a categorical parameter chooses from"),
    Key("search_space.NAME.when", "mapping", "none; the core adds its own (momentum only "
        "with optimizer momentum)", "{PARENT: value or list}: PARENT a categorical "
        "parameter or a fixed value", "search this parameter only when the condition holds"),
    Key("baseline", "list of mappings", "none", "configs inside the search space",
        "configs tried first (the tutorial's, say), so the study beats a known point"),
    Key("heartbeat", "mapping", "see its keys", "interval, grace_period, max_retry",
        "how trials of a dead worker are found (PostgreSQL storage)"),
    Key("heartbeat.interval", "integer >= 1", str(_RESILIENCE.heartbeat_interval), "seconds",
        "how often a running trial says it is alive"),
    Key("heartbeat.grace_period", "integer >= 1", str(_RESILIENCE.grace_period),
        "seconds, longer than interval", "silence after which a trial is failed and retried"),
    Key("heartbeat.max_retry", "integer >= 0", str(_RESILIENCE.max_retry), "an integer >= 0",
        "retries of a trial whose process died; a trial stopped by a signal is retried "
        "however often"),
    Key("store_timeout", "number > 0", f"{_RESILIENCE.store_timeout:g}", "seconds",
        "how long a store that went away is retried before the worker stops"),
    Key("fuse", "integer or auto", "auto (1 on CPU, 8 on CUDA)",
        f"auto, or an integer in [1, {MAX_FUSE}]", "trials trained at once as one model"),
    Key("checkpoint", "boolean or mapping", "true", "true, false, or {every: SECONDS}",
        "keep each trial's training state, so an interrupted or paused trial goes on where "
        "it stopped; asha needs it"),
    Key("checkpoint.every", "number or auto", "auto",
        "auto (at most 2% of the time), or seconds >= 0 (0: every epoch)",
        "how often a checkpoint is written"),
    Key("registry", "boolean or mapping", "true (the study's name)", "true, false, or "
        "{name: NAME}", "the registered model `export` adds the winner to"),
    Key("registry.name", "string", "the study's name",
        "1 to 100 letters, digits, '.', '_' or '-'", "the model's name in MLflow's registry"),
)
BY_NAME = {key.name: key for key in KEYS}


def children(parent: str) -> tuple[str, ...]:
    """The keys a mapping accepts, in the table's order: children("") is the top level."""
    return tuple(key.leaf for key in KEYS if key.parent == parent)


def param_keys(kind: str) -> tuple[str, ...]:
    """The keys of one search_space parameter of `kind` (float, int, categorical)."""
    ranges_only, categorical_only = ("low", "high", "log", "step"), ("choices",)
    left_out = ranges_only if kind == "categorical" else categorical_only
    return tuple(k for k in children("search_space.NAME") if k not in left_out)
