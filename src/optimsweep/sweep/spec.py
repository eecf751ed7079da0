"""Sweep files: read with yaml.safe_load, validated completely before anything runs.

Every error names the file, the key and what is allowed, and is raised before a study, a
trial or an MLflow run exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from optimsweep.core.data import TASKS
from optimsweep.core.models import MODELS, MODELS_BY_TASK
from optimsweep.core.train import (
    CONDITIONS,
    CONFIG_DEFAULTS,
    LOSSES,
    TASK_LOSS,
    ConfigError,
    TrainConfig,
    metric_name,
)
from optimsweep.core.usercode import UserCodeError, check_arguments, is_import_string, resolve
from optimsweep.errors import SpecError
from optimsweep.records.storage import Resilience
from optimsweep.sweep.samplers import (
    PRUNERS,
    SAMPLERS,
    allowed_options,
    build_pruner,
    build_sampler,
    grid_space,
    option_type_problem,
)

TOP_LEVEL_KEYS = ("name", "description", "task", "model", "loss", "metric", "direction",
                  "seed",
                  "sampler", "pruner", "budget", "storage", "tracking_uri", "data", "fixed",
                  "search_space", "baseline", "heartbeat", "store_timeout", "fuse")
MAX_FUSE = 64
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")
BUDGET_KEYS = ("n_trials", "epochs", "timeout")
DATA_KEYS = ("factory", "kwargs", "val_size", "split_seed", "train_subset", "in_memory_mb")
SPLIT_KEYS = DATA_KEYS[2:]  # training values every trial shares
MODEL_KEYS = ("factory", "kwargs")
MODEL_PARAM = "model."  # a model factory's keyword argument in search_space or fixed
# Where the code is, not what it does: a study moved to another folder or machine stays
# the same study.
NOT_FINGERPRINTED = ("code_dir", "in_memory_mb")
HEARTBEAT_KEYS = ("interval", "grace_period", "max_retry")
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "postgresql+psycopg")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"float": ("type", "low", "high", "log", "step", "when"),
              "int": ("type", "low", "high", "log", "step", "when"),
              "categorical": ("type", "choices", "when")}
# Set by the spec itself (task, model, budget, data) or by the machine (device).
NOT_SEARCHABLE = ("task", "model", "epochs", "device", "val_size", "split_seed", "train_subset")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")



@dataclass
class Param:
    """One searched parameter: an Optuna distribution, plus `when` (what it depends on)."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    when: dict[str, tuple] = field(default_factory=dict)


@dataclass
class Budget:
    n_trials: int = 20
    epochs: int = 10
    timeout: float | None = None  # seconds for one `sweep` invocation


@dataclass
class Spec:
    name: str
    path: Path
    text: str  # the file as written, logged with every study
    task: str = "fashion_mnist"
    model: str = "mlp"
    description: str = ""
    metric: str = "val_accuracy"
    direction: str = "maximize"
    seed: int = 0
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    budget: Budget = field(default_factory=Budget)
    storage: str | None = None
    tracking_uri: str | None = None
    resilience: Resilience = field(default_factory=Resilience)
    fuse: int | str = "auto"  # trials trained at once as one model; auto: train.default_fuse
    model_kwargs: dict = field(default_factory=dict)  # the model factory's fixed arguments
    data_kwargs: dict = field(default_factory=dict)  # the data factory's arguments
    loss: str | None = None  # None: the built-in task's own
    metric_ref: str | None = None  # the user's metric function, when `metric` names one
    code_dir: str | None = None  # the sweep file's folder, when it names user code
    data: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    search_space: dict[str, Param] = field(default_factory=dict)
    baseline: list[dict] = field(default_factory=list)

    def base_config(self) -> dict:
        """Training values every trial shares: task, model (and their factories' arguments),
        loss, data split, epochs, fixed."""
        optional = {"loss": self.loss, "metric": self.metric_ref, "code_dir": self.code_dir}
        return {"task": self.task, "model": self.model, "epochs": self.budget.epochs,
                "seed": self.seed,
                **{f"{MODEL_PARAM}{k}": v for k, v in self.model_kwargs.items()},
                **{f"data.{k}": v for k, v in self.data_kwargs.items()},
                **{k: v for k, v in optional.items() if v is not None},
                **self.data, **self.fixed}

    def fingerprint(self) -> str:
        """What makes trials comparable (factories and their arguments included); budget
        size, stores and where the code lives may change on resume."""
        space = {k: [optuna.distributions.distribution_to_json(p.distribution),
                     {c: list(v) for c, v in p.when.items()}]
                 for k, p in self.search_space.items()}
        base = {k: v for k, v in self.base_config().items() if k not in NOT_FINGERPRINTED}
        blob = json.dumps([base, space, self.metric, self.direction],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fail(path: Path, key: str, problem: str) -> SpecError:
    return SpecError(f"{path}: {key}: {problem}")


def _mapping(path: Path, key: str, value, allowed: tuple | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        for k in value:
            if k not in allowed:
                raise _fail(path, f"{key}.{k}" if key else str(k),
                            f"unknown key; allowed: {', '.join(allowed)}")
    return value


def _number(path: Path, key: str, value, kind: type = float):
    """YAML 1.1 reads `1e-4` as a string: accept it as the number it means."""
    if isinstance(value, bool):
        raise _fail(path, key, f"{value!r} is not a number")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise _fail(path, key, f"{value!r} is not a number") from None
    if not isinstance(number, int | float) or not math.isfinite(number):
        raise _fail(path, key, f"{value!r} is not a finite number")
    if kind is int:
        if float(number) != int(number):
            raise _fail(path, key, f"{value!r} is not an integer")
        return int(number)
    return float(number)


def _check_train_value(path: Path, key: str, name: str, value, base: dict) -> Any:
    """Validate one training value with the core's own rules; return it coerced. A model
    factory's argument is the factory's to judge (its signature is checked separately)."""
    if name.startswith(MODEL_PARAM):
        if not name[len(MODEL_PARAM):].isidentifier():
            raise _fail(path, key, "not a keyword argument name")
        return value
    try:
        return getattr(TrainConfig.from_dict({**base, name: value}), name)
    except ConfigError as exc:
        raise _fail(path, key, str(exc)) from None


def _parse_param(path: Path, name: str, raw, base: dict) -> Param | Any:
    """A mapping with `type` becomes a Param; anything else is a fixed value."""
    key = f"search_space.{name}"
    if not isinstance(raw, dict):
        return _check_train_value(path, key, name, raw, base)
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        raise _fail(path, f"{key}.type", f"{kind!r} is not allowed; choose one of: "
                    f"{', '.join(PARAM_TYPES)}")
    _mapping(path, key, raw, PARAM_KEYS[kind])
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(path, f"{key}.choices", "expected a non-empty list")
        choices = [_check_train_value(path, f"{key}.choices", name, c, base) for c in choices]
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(path, f"{key}.choices", "choices repeat")
        dist = optuna.distributions.CategoricalDistribution(choices)
    else:
        num = int if kind == "int" else float
        for bound in ("low", "high"):
            if bound not in raw:
                raise _fail(path, f"{key}.{bound}", "required for a range")
        low = _number(path, f"{key}.low", raw["low"], num)
        high = _number(path, f"{key}.high", raw["high"], num)
        if not low < high:
            raise _fail(path, key, f"empty or inverted range: low {low} must be < high {high}"
                        " (give a plain value to fix a parameter)")
        for bound, value in (("low", low), ("high", high)):
            _check_train_value(path, f"{key}.{bound}", name, value, base)
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise _fail(path, f"{key}.log", f"{log!r} is not true or false")
        step = raw.get("step")
        if step is not None:
            step = _number(path, f"{key}.step", step, num)
            if step <= 0:
                raise _fail(path, f"{key}.step", f"{step} must be > 0")
        if log and low <= 0:
            raise _fail(path, f"{key}.low", f"a log range needs low > 0, got {low}")
        if log and step is not None and kind == "float":
            raise _fail(path, key, "log and step can't be combined")
        try:
            if kind == "int":
                dist = optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
            else:
                dist = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
        except ValueError as exc:
            raise _fail(path, key, str(exc)) from None
    return Param(name, dist, when=_parse_when(path, key, raw.get("when")))


def _check_store_urls(path: Path, spec: Spec) -> None:
    from optimsweep.util.urls import redact

    if spec.storage and "://" in spec.storage and \
            spec.storage.split("://")[0] not in STORAGE_SCHEMES:
        raise _fail(path, "storage", f"{redact(spec.storage)} is not allowed; give a journal "
                    "file path, sqlite:///FILE (one process) or postgresql://USER@HOST/DB")
    uri = spec.tracking_uri
    if uri and ("://" not in uri or uri.split("://")[0] not in TRACKING_SCHEMES):
        raise _fail(path, "tracking_uri", f"{redact(uri)} is not allowed (MLflow 3 has no "
                    "plain file store); give sqlite:///FILE, http(s)://HOST:PORT (an MLflow "
                    "server) or postgresql://USER@HOST/DB")


def _parse_resilience(path: Path, raw: dict) -> Resilience:
    beat = _mapping(path, "heartbeat", raw.get("heartbeat"), HEARTBEAT_KEYS)
    out = Resilience()
    for key, attr in (("interval", "heartbeat_interval"), ("grace_period", "grace_period"),
                      ("max_retry", "max_retry")):
        if key in beat:
            value = _number(path, f"heartbeat.{key}", beat[key], int)
            if value < (0 if key == "max_retry" else 1):
                raise _fail(path, f"heartbeat.{key}",
                            f"{value} must be >= {0 if key == 'max_retry' else 1}")
            setattr(out, attr, value)
    if out.grace_period <= out.heartbeat_interval:
        raise _fail(path, "heartbeat.grace_period", f"{out.grace_period} must be longer than "
                    f"the interval ({out.heartbeat_interval} s), else a live trial looks dead")
    if raw.get("store_timeout") is not None:
        out.store_timeout = _number(path, "store_timeout", raw["store_timeout"])
        if out.store_timeout <= 0:
            raise _fail(path, "store_timeout", f"{out.store_timeout} must be > 0 (seconds)")
    return out


def _parse_when(path: Path, key: str, raw) -> dict[str, tuple]:
    when = _mapping(path, f"{key}.when", raw)
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}


def _options(path: Path, key: str, raw, registry: dict, default: str) -> dict:
    if isinstance(raw, str) or raw is None:
        raw = {"name": raw or default}
    raw = dict(_mapping(path, key, raw))
    name = raw.get("name", default)
    if name not in registry:
        raise _fail(path, f"{key}.name", f"{name!r} is not allowed; choose one of: "
                    f"{', '.join(registry)}")
    allowed = allowed_options(registry[name])
    for option, value in raw.items():
        if option == "name":
            continue
        if option not in allowed:
            raise _fail(path, f"{key}.{option}", f"not an option of {name}; allowed: "
                        f"{', '.join(allowed) or 'none'}")
        problem = option_type_problem(value, allowed[option])
        if problem:
            raise _fail(path, f"{key}.{option}", f"{problem} (option of {name}: "
                        f"{allowed[option]})")
    return raw


def _check_conditions(path: Path, space: dict[str, Param], fixed: dict) -> None:
    for name, param in space.items():
        for parent, values in param.when.items():
            key = f"search_space.{name}.when.{parent}"
            if parent in fixed:
                possible = (fixed[parent],)
            elif parent in space and isinstance(space[parent].distribution,
                                                optuna.distributions.CategoricalDistribution):
                if space[parent].when:
                    raise _fail(path, key, "a condition must name an unconditional parameter")
                possible = space[parent].distribution.choices
            else:
                raise _fail(path, key, "must name a categorical search_space parameter or a "
                            "fixed value")
            for v in values:
                if v not in possible:
                    raise _fail(path, key, f"{v!r} is not a possible value; possible: "
                                f"{', '.join(map(str, possible))}")


def _add_implied_conditions(path: Path, space: dict[str, Param], fixed: dict) -> None:
    """momentum only for momentum SGD, betas only for Adam and AdamW, ...: the core's own
    CONDITIONS, narrowed to the parent's possible values (so a study's fingerprint does not
    change when the core learns a new optimizer)."""
    for name, param in space.items():
        if name not in CONDITIONS:
            continue
        parent, values = CONDITIONS[name]
        if parent in space:
            possible = space[parent].distribution.choices
        else:
            possible = (fixed.get(parent, CONFIG_DEFAULTS[parent]),)
        param.when.setdefault(parent, tuple(v for v in values if v in possible) or values)
        if not set(param.when[parent]) & set(possible):
            raise _fail(path, f"search_space.{name}", f"never applies: it is used only when "
                        f"{parent} is {' or '.join(values)}, and {parent} can only be "
                        f"{', '.join(map(str, possible))}")


def _check_baseline(path: Path, raw, spec: Spec) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail(path, "baseline", "expected a list of parameter mappings")
    out = []
    for i, entry in enumerate(raw):
        key = f"baseline[{i}]"
        entry = dict(_mapping(path, key, entry, tuple(spec.search_space)))
        values = {**spec.base_config(), **entry}
        for name, value in entry.items():
            values[name] = _check_train_value(path, f"{key}.{name}", name, value, values)
            dist = spec.search_space[name].distribution
            if not dist._contains(dist.to_internal_repr(values[name])):
                raise _fail(path, f"{key}.{name}", f"{values[name]!r} lies outside the "
                            f"search space ({optuna.distributions.distribution_to_json(dist)})")
            entry[name] = values[name]
        out.append(entry)
    return out


def parse_spec(text: str, path: Path | str = "<sweep>") -> Spec:
    path = Path(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    raw = _mapping(path, "", raw, TOP_LEVEL_KEYS)
    if not raw:
        raise SpecError(f"{path}: empty sweep file; expected keys: {', '.join(TOP_LEVEL_KEYS)}")

    name = raw.get("name", "sweep" if str(path) == "<sweep>" else path.stem)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name.strip()):
        raise _fail(path, "name", f"{name!r} is not allowed: use 1 to 100 letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit (it names the study, "
                    "its MLflow experiment and its folder under exports/)")
    code = _parse_code(path, raw)
    task, model, loss = code["task"], code["model"], code["loss"]
    kind = LOSSES[loss or TASK_LOSS[task]][1]
    metric = raw.get("metric", "val_accuracy" if kind is not None else "val_loss")
    metric_ref = None
    if is_import_string(metric):
        metric_ref, metric = metric, f"val_{metric_name(metric)}"
    elif metric not in METRICS:
        raise _fail(path, "metric", f"{metric!r} is not allowed; choose one of: "
                    f"{', '.join(METRICS)}, or a function (outputs, targets) -> float by "
                    "import string (module:function)")
    if metric == "val_accuracy" and kind is None:
        raise _fail(path, "metric", f"val_accuracy needs a classification loss (one of: "
                    f"{', '.join(k for k, v in LOSSES.items() if v[1])}); choose val_loss")
    direction = raw.get("direction", METRICS.get(metric, "maximize"))
    if direction not in DIRECTIONS:
        raise _fail(path, "direction", f"{direction!r} is not allowed; choose one of: "
                    f"{', '.join(DIRECTIONS)}")

    budget_raw = _mapping(path, "budget", raw.get("budget"), BUDGET_KEYS)
    budget = Budget()
    if "n_trials" in budget_raw:
        budget.n_trials = _number(path, "budget.n_trials", budget_raw["n_trials"], int)
    if "epochs" in budget_raw:
        budget.epochs = _number(path, "budget.epochs", budget_raw["epochs"], int)
    if budget_raw.get("timeout") is not None:
        budget.timeout = _number(path, "budget.timeout", budget_raw["timeout"])
    for key, value in (("n_trials", budget.n_trials), ("epochs", budget.epochs),
                       ("timeout", budget.timeout)):
        if value is not None and value <= 0:
            raise _fail(path, f"budget.{key}", f"{value} must be > 0")

    spec = Spec(name=name.strip(), path=path, text=text, task=task, model=model,
                description=str(raw.get("description", "")), metric=metric,
                direction=direction, budget=budget, model_kwargs=code["model_kwargs"],
                data_kwargs=code["data_kwargs"], loss=loss, metric_ref=metric_ref,
                code_dir=code["code_dir"])
    spec.seed = _check_train_value(path, "seed", "seed", raw.get("seed", 0),
                                   spec.base_config())
    for key in ("storage", "tracking_uri"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _fail(path, key, "expected a URL or a path")
        setattr(spec, key, value)
    _check_store_urls(path, spec)
    spec.resilience = _parse_resilience(path, raw)
    spec.fuse = raw.get("fuse", "auto")
    if spec.fuse != "auto" and not (isinstance(spec.fuse, int) and not isinstance(spec.fuse, bool)
                                    and 1 <= spec.fuse <= MAX_FUSE):
        raise _fail(path, "fuse", f"{spec.fuse!r} is not allowed; choose auto or an integer "
                    f"in [1, {MAX_FUSE}] (trials trained at once as one model)")
    spec.sampler = _options(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe")
    spec.pruner = _options(path, "pruner", raw.get("pruner"), PRUNERS, "median")

    data = {k: v for k, v in code["data"].items() if k in SPLIT_KEYS}
    base = spec.base_config()
    spec.data = {k: _check_train_value(path, f"data.{k}", k, v, base) for k, v in data.items()}

    settable = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SEARCHABLE]
    fixed = _settable(path, "fixed", raw.get("fixed"), settable)
    base = spec.base_config()
    spec.fixed = {k: _check_train_value(path, f"fixed.{k}", k, v, base) for k, v in fixed.items()}

    space_raw = _settable(path, "search_space", raw.get("search_space"), settable)
    for name_, value in space_raw.items():
        if name_ in spec.fixed:
            raise _fail(path, f"search_space.{name_}", "also given under fixed; keep one")
        parsed = _parse_param(path, name_, value, spec.base_config())
        if isinstance(parsed, Param):
            spec.search_space[name_] = parsed
        else:
            spec.fixed[name_] = parsed
    if not spec.search_space:
        raise _fail(path, "search_space", "nothing to search; give at least one range or "
                    "list of choices")
    _check_model_arguments(spec)
    _check_conditions(path, spec.search_space, spec.fixed)
    _add_implied_conditions(path, spec.search_space, spec.fixed)
    spec.search_space = _parents_first(spec.search_space)
    spec.baseline = _check_baseline(path, raw.get("baseline"), spec)
    _check_sampler_fits(spec)
    _dry_run(spec)
    return spec


def _settable(path: Path, key: str, raw, settable: list[str]) -> dict:
    """A mapping of training values (`fixed`, `search_space`): the core's own names, and
    the model factory's arguments as model.NAME."""
    value = _mapping(path, key, raw)
    for k in value:
        if k not in settable and not (isinstance(k, str) and k.startswith(MODEL_PARAM)):
            raise _fail(path, f"{key}.{k}", f"unknown key; allowed: {', '.join(settable)}, "
                        "or model.NAME (an argument of the model factory)")
    return value


def _user_callable(path: Path, key: str, ref: str, code_dir: str | None):
    try:
        return resolve(ref, code_dir)
    except UserCodeError as exc:
        raise _fail(path, key, str(exc)) from exc


def _parse_code(path: Path, raw: dict) -> dict:
    """task or data.factory, model (a name, or a factory with its arguments), loss: each
    import string resolved now, with the sweep file's folder importable."""
    data = dict(_mapping(path, "data", raw.get("data"), DATA_KEYS))
    model_raw = raw.get("model")
    if isinstance(model_raw, dict):
        model_raw = _mapping(path, "model", model_raw, MODEL_KEYS)
        if "factory" not in model_raw:
            raise _fail(path, "model.factory", "required: the import string of a function or "
                        "class that returns the model (module:callable)")
    factory = data.get("factory")
    if factory is not None and "task" in raw:
        raise _fail(path, "task", "give either task (a built-in) or data.factory, not both")
    uses_code = factory is not None or isinstance(model_raw, dict) or is_import_string(
        model_raw) or is_import_string(raw.get("metric"))
    code_dir = str(path.resolve().parent) if uses_code and path.is_file() else None
    if factory is None:
        task = raw.get("task", "fashion_mnist")
        if task not in TASKS:
            raise _fail(path, "task", f"{task!r} is not allowed; choose one of: "
                        f"{', '.join(TASKS)}, or name your own data under data.factory")
        for key in ("kwargs",):
            if key in data:
                raise _fail(path, f"data.{key}", "only with data.factory (your own data)")
    else:
        if not is_import_string(factory):
            raise _fail(path, "data.factory", f"{factory!r} is not an import string; write "
                        "it as module:function, e.g. my_data:load")
        task = factory
        fn = _user_callable(path, "data.factory", factory, code_dir)
        kwargs = _mapping(path, "data.kwargs", data.get("kwargs"))
        try:
            check_arguments(factory, fn, list(kwargs))
        except UserCodeError as exc:
            raise _fail(path, "data.kwargs", str(exc)) from None
    model_kwargs = {}
    if isinstance(model_raw, dict):
        model, model_kwargs = model_raw["factory"], dict(
            _mapping(path, "model.kwargs", model_raw.get("kwargs")))
        if not is_import_string(model):
            raise _fail(path, "model.factory", f"{model!r} is not an import string; write it "
                        "as module:callable, e.g. my_models:build")
    elif model_raw is None:
        if task not in TASKS:
            raise _fail(path, "model", "required with data.factory: {factory: "
                        "module:callable, kwargs: {...}}, or a built-in model "
                        f"({', '.join(MODELS)})")
        model = MODELS_BY_TASK[task][0]
    else:
        model = model_raw
        if not is_import_string(model) and model not in MODELS:
            raise _fail(path, "model", f"{model!r} is not allowed; choose one of: "
                        f"{', '.join(MODELS)}, or a factory: {{factory: module:callable}}")
    if task in TASKS and model in MODELS and model not in MODELS_BY_TASK[task]:
        raise _fail(path, "model", f"{model!r} is not allowed for {task}; choose one of: "
                    f"{', '.join(MODELS_BY_TASK[task])}")
    if is_import_string(model):
        _user_callable(path, "model.factory" if isinstance(model_raw, dict) else "model",
                       model, code_dir)
    loss = raw.get("loss")
    if loss is None and task not in TASKS:
        raise _fail(path, "loss", f"required with data.factory; choose one of: "
                    f"{', '.join(LOSSES)}")
    if loss is not None and loss not in LOSSES:
        raise _fail(path, "loss", f"{loss!r} is not allowed; choose one of: "
                    f"{', '.join(LOSSES)}")
    if is_import_string(raw.get("metric")):
        _user_callable(path, "metric", raw["metric"], code_dir)
    return {"task": task, "model": model, "model_kwargs": model_kwargs, "loss": loss,
            "data_kwargs": dict(data.get("kwargs") or {}), "data": data,
            "code_dir": code_dir}


def _check_model_arguments(spec: Spec) -> None:
    """The model factory takes every argument the file gives it, fixed or searched, and
    gets every argument it needs."""
    from optimsweep.core.models import MODELS as BUILT_IN

    fn = resolve(BUILT_IN.get(spec.model, spec.model), spec.code_dir)
    given = {**{k: "model.kwargs" for k in spec.model_kwargs},
             **{k[len(MODEL_PARAM):]: f"fixed.{k}" for k in spec.fixed
                if k.startswith(MODEL_PARAM)},
             **{k[len(MODEL_PARAM):]: f"search_space.{k}" for k in spec.search_space
                if k.startswith(MODEL_PARAM)}}
    for name, key in given.items():
        try:
            check_arguments(spec.model, fn, [name], complete=False)
        except UserCodeError as exc:
            raise _fail(spec.path, key, str(exc)) from None
    try:
        check_arguments(spec.model, fn, list(given))
    except UserCodeError as exc:
        raise _fail(spec.path, "model.kwargs", str(exc)) from None


def _parents_first(space: dict[str, Param]) -> dict[str, Param]:
    """Order the space so that a parameter comes after every parameter its `when` names,
    whatever order the file lists them in: a condition is checked against values already
    sampled."""
    def depth(name: str) -> int:
        parents = [p for p in space[name].when if p in space and p != name]
        return 1 + max(map(depth, parents)) if parents else 0

    return dict(sorted(space.items(), key=lambda item: depth(item[0])))


def _check_sampler_fits(spec: Spec) -> None:
    """Build the sampler and pruner once now, so bad options fail before any study exists."""
    for key, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:
            build(spec)
        except (TypeError, ValueError) as exc:
            raise _fail(spec.path, key, str(exc)) from None
    if spec.sampler.get("name") == "grid":
        from optimsweep.sweep.space import applies

        grid = grid_space(spec)
        for i, entry in enumerate(spec.baseline):
            values = {**spec.base_config(), **entry}
            missing = [n for n, p in spec.search_space.items()
                       if n not in entry and applies(p, values)]
            if missing:
                raise _fail(spec.path, f"baseline[{i}]", "the grid sampler needs every "
                            f"parameter of a baseline; missing: {', '.join(missing)}")
            for n, v in entry.items():
                if v not in grid[n]:
                    raise _fail(spec.path, f"baseline[{i}].{n}", f"{v!r} is not a grid point;"
                                f" grid: {', '.join(map(str, grid[n]))}")


def _dry_run(spec: Spec) -> None:
    """Ask the sampler and pruner for a few trials of this space (with the baselines first)
    in memory, with no training: option values that only fail when used, fail now."""
    from optimsweep.sweep.space import suggest_config

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction=spec.direction, sampler=build_sampler(spec, 0),
                                        pruner=build_pruner(spec))
            study.stop = lambda: None  # a grid sampler stops studies: not ours to end here
            for params in spec.baseline:
                study.enqueue_trial(params)
            for i in range(len(spec.baseline) + 3):
                key = f"baseline[{i}]" if i < len(spec.baseline) else "sampler"
                trial = study.ask()
                try:
                    suggest_config(trial, spec)
                except Exception as exc:  # noqa: BLE001  (whatever it is, it is the file's)
                    raise _fail(spec.path, key, f"can't sample: {exc}") from None
                try:
                    for step in (1, 2):
                        trial.report(float(i + step), step)
                        trial.should_prune()
                except Exception as exc:  # noqa: BLE001
                    raise _fail(spec.path, "pruner", f"can't prune: {exc}") from None
                study.tell(trial, float(i))
    finally:
        optuna.logging.set_verbosity(verbosity)


def load_spec(path: Path | str) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    except OSError as exc:
        raise SpecError(f"{path}: can't be read: {exc.strerror}") from None
    if "\x00" in text:
        raise SpecError(f"{path}: not a text file (UTF-8 YAML expected)")
    return parse_spec(text, path)
