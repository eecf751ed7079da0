"""Sweep files: read with yaml.safe_load and parsed into a frozen Spec.

Parsing checks every key and value (training values with the core's own rules); every error
names the file, the key and what is allowed. The checks that import the user's code or run
Optuna are check.py's, which callers go through (check.load_spec); this module imports
neither check.py nor the code that samples a space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from optimsweep.core.checkpoint import parse_every
from optimsweep.core.data import TASKS
from optimsweep.core.models import MODELS, MODELS_BY_TASK
from optimsweep.core.train import (
    CONDITIONS,
    CONFIG_DEFAULTS,
    LOSSES,
    ConfigError,
    TrainConfig,
    metric_name,
)
from optimsweep.core.usercode import is_import_string
from optimsweep.errors import SpecError
from optimsweep.records.optuna_adapter import contains
from optimsweep.records.storage import Resilience
from optimsweep.sweep import keys
from optimsweep.sweep.asha import Asha
from optimsweep.sweep.keys import (
    DIRECTIONS,
    MAX_FUSE,
    METRICS,
    PARAM_TYPES,
    STORAGE_SCHEMES,
    TRACKING_SCHEMES,
)
from optimsweep.sweep.samplers import PRUNERS, SAMPLERS, allowed_options, option_type_problem
from optimsweep.util import values
from optimsweep.util.urls import redact

TOP_LEVEL_KEYS = keys.children("")
REGISTRY_KEYS = keys.children("registry")
BUDGET_KEYS = keys.children("budget")
DATA_KEYS = keys.children("data")
SPLIT_KEYS = DATA_KEYS[2:]  # training values every trial shares
MODEL_KEYS = keys.children("model")
MODEL_PARAM = "model."  # a model factory's keyword argument in search_space or fixed
# Where the code is, not what it does: a study moved to another folder or machine stays
# the same study.
NOT_FINGERPRINTED = ("code_dir", "in_memory_mb")
HEARTBEAT_KEYS = keys.children("heartbeat")
CHECKPOINT_KEYS = keys.children("checkpoint")
PARAM_KEYS = {kind: keys.param_keys(kind) for kind in PARAM_TYPES}
# Set by the spec itself (task, model, budget, data) or by the machine (device).
NOT_SEARCHABLE = ("task", "model", "epochs", "device", "val_size", "split_seed", "train_subset")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Param:
    """One searched parameter: an Optuna distribution, plus `when` (what it depends on)."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    when: dict[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    n_trials: int = 20
    epochs: int = 10
    timeout: float | None = None  # seconds for one `sweep` invocation
    report_every: float = 1.0  # epochs between reports (pruning, rungs): 1, or 1/R

    @property
    def reports_per_epoch(self) -> int:
        return round(1 / self.report_every)

    @property
    def steps(self) -> int:
        """Reports in a whole trial: the steps its curve and its pruner count in."""
        return self.epochs * self.reports_per_epoch


@dataclass(frozen=True)
class Spec:
    """A parsed sweep file. Built once by `parse`; check.py's load_spec also checks it."""

    name: str
    path: Path
    text: str  # the file as written, logged with every study
    task: str  # a built-in task, or the data factory's import string
    model: str  # a built-in model, or the model factory's import string
    description: str
    metric: str
    direction: str
    seed: int
    sampler: dict
    pruner: dict
    budget: Budget
    storage: str | None
    tracking_uri: str | None
    resilience: Resilience
    fuse: int | str  # trials trained at once as one model; auto: train.default_fuse
    model_kwargs: dict  # the model factory's fixed arguments
    data_kwargs: dict  # the data factory's arguments
    loss: str | None  # None: the built-in task's own
    metric_ref: str | None  # the user's metric function, when `metric` names one
    code_dir: str | None  # the sweep file's folder, when it names user code
    data: dict
    fixed: dict
    search_space: dict[str, Param]  # parents first: a `when` names parameters before it
    baseline: list[dict]
    base: dict  # base_config(), computed once by the parser
    model_key: str = "model"  # the key that names the model factory: model or model.factory
    # seconds between checkpoints (0: every epoch), "auto" (core/checkpoint.py), None: never
    checkpoint: float | str | None = "auto"
    # the registered model `export` adds the winner to; None: it registers nothing
    registry: str | None = None

    @property
    def asha(self) -> Asha | None:
        """Successive halving with promotion, when the file's pruner is `asha`."""
        return Asha.of(self.pruner)

    @property
    def rungs(self) -> list[int]:
        """The steps at which successive halving with promotion judges a trial (none
        without it): every trial trains the budget's epochs."""
        return self.asha.rungs(self.budget.steps) if self.asha else []

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def base_config(self) -> dict:
        """Training values every trial shares: task, model (and their factories' arguments),
        loss, data split, epochs, fixed. A fresh dict each call."""
        return dict(self.base)

    def fingerprint(self) -> str:
        """What makes trials comparable (factories and their arguments included); budget
        size, stores and where the code lives may change on resume."""
        space = {k: [optuna.distributions.distribution_to_json(p.distribution),
                     {c: list(v) for c, v in p.when.items()}]
                 for k, p in self.search_space.items()}
        base = {k: v for k, v in self.base.items() if k not in NOT_FINGERPRINTED}
        compared = [base, space, self.metric, self.direction]
        if self.budget.report_every != 1:  # steps then count reports: not comparable with
            compared.append(self.budget.report_every)  # another spacing (absent: older ids)
        blob = json.dumps(compared, sort_keys=True, default=str)
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
    try:
        return values.number(value, kind)
    except values.Unfit as exc:
        raise _fail(path, key, f"{value!r} is {exc}") from None


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


def _check_store_urls(path: Path, storage: str | None, uri: str | None) -> None:
    if storage and "://" in storage and storage.split("://")[0] not in STORAGE_SCHEMES:
        raise _fail(path, "storage", f"{redact(storage)} is not allowed; give a journal "
                    "file path, sqlite:///FILE (one process) or postgresql://USER@HOST/DB")
    if uri and ("://" not in uri or uri.split("://")[0] not in TRACKING_SCHEMES):
        raise _fail(path, "tracking_uri", f"{redact(uri)} is not allowed (MLflow 3 has no "
                    "plain file store); give sqlite:///FILE, http(s)://HOST:PORT (an MLflow "
                    "server) or postgresql://USER@HOST/DB")


def _parse_resilience(path: Path, raw: dict) -> Resilience:
    beat = _mapping(path, "heartbeat", raw.get("heartbeat"), HEARTBEAT_KEYS)
    given = {}
    for key, attr in (("interval", "heartbeat_interval"), ("grace_period", "grace_period"),
                      ("max_retry", "max_retry")):
        if key in beat:
            value = _number(path, f"heartbeat.{key}", beat[key], int)
            if value < (0 if key == "max_retry" else 1):
                raise _fail(path, f"heartbeat.{key}",
                            f"{value} must be >= {0 if key == 'max_retry' else 1}")
            given[attr] = value
    out = Resilience(**given)
    if out.grace_period <= out.heartbeat_interval:
        raise _fail(path, "heartbeat.grace_period", f"{out.grace_period} must be longer than "
                    f"the interval ({out.heartbeat_interval} s), else a live trial looks dead")
    if raw.get("store_timeout") is not None:
        timeout = _number(path, "store_timeout", raw["store_timeout"])
        if timeout <= 0:
            raise _fail(path, "store_timeout", f"{timeout} must be > 0 (seconds)")
        out = dataclasses.replace(out, store_timeout=timeout)
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
        for parent, wanted in param.when.items():
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
            for v in wanted:
                if v not in possible:
                    raise _fail(path, key, f"{v!r} is not a possible value; possible: "
                                f"{', '.join(map(str, possible))}")


def _add_implied_conditions(path: Path, space: dict[str, Param],
                            fixed: dict) -> dict[str, Param]:
    """momentum only for momentum SGD, betas only for Adam and AdamW, ...: the core's own
    CONDITIONS, narrowed to the parent's possible values (so a study's fingerprint does not
    change when the core learns a new optimizer). Returns the space with them added."""
    out = {}
    for name, param in space.items():
        out[name] = param
        if name not in CONDITIONS:
            continue
        parent, allowed = CONDITIONS[name]
        if parent in space:
            possible = space[parent].distribution.choices
        else:
            possible = (fixed.get(parent, CONFIG_DEFAULTS[parent]),)
        when = {**param.when}
        when.setdefault(parent, tuple(v for v in allowed if v in possible) or allowed)
        if not set(when[parent]) & set(possible):
            raise _fail(path, f"search_space.{name}", f"never applies: it is used only when "
                        f"{parent} is {' or '.join(allowed)}, and {parent} can only be "
                        f"{', '.join(map(str, possible))}")
        out[name] = dataclasses.replace(param, when=when)
    return out


def _parse_baseline(path: Path, raw, space: dict[str, Param], base: dict) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail(path, "baseline", "expected a list of parameter mappings")
    out = []
    for i, entry in enumerate(raw):
        key = f"baseline[{i}]"
        entry = dict(_mapping(path, key, entry, tuple(space)))
        given = {**base, **entry}
        for name, value in entry.items():
            given[name] = _check_train_value(path, f"{key}.{name}", name, value, given)
            dist = space[name].distribution
            if not contains(dist, given[name]):
                raise _fail(path, f"{key}.{name}", f"{given[name]!r} lies outside the "
                            f"search space ({optuna.distributions.distribution_to_json(dist)})")
            entry[name] = given[name]
        out.append(entry)
    return out


def read(path: Path | str) -> str:
    """The text of a sweep file, or a SpecError saying why it can't be read as one."""
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
    return text


def parse(text: str, path: Path | str = "<sweep>") -> Spec:
    """A sweep file's text -> its Spec, every key and value checked; the user's code is
    not imported here (check.py does that, and runs the sampler)."""
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
    kind = LOSSES[code["loss_used"]][1]
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
    budget = _parse_budget(path, raw)

    # The training values every trial shares, in base_config()'s order; each part is
    # checked with the core's rules against the parts before it.
    optional = {"loss": loss, "metric": metric_ref, "code_dir": code["code_dir"]}
    base = {"task": task, "model": model, "epochs": budget.epochs, "seed": 0,
            **{f"{MODEL_PARAM}{k}": v for k, v in code["model_kwargs"].items()},
            **{f"data.{k}": v for k, v in code["data_kwargs"].items()},
            **{k: v for k, v in optional.items() if v is not None}}
    seed = base["seed"] = _check_train_value(path, "seed", "seed", raw.get("seed", 0), base)
    stores = {}
    for key in ("storage", "tracking_uri"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _fail(path, key, "expected a URL or a path")
        stores[key] = value
    _check_store_urls(path, stores["storage"], stores["tracking_uri"])
    resilience = _parse_resilience(path, raw)
    fuse = raw.get("fuse", "auto")
    if fuse != "auto" and not (isinstance(fuse, int) and not isinstance(fuse, bool)
                               and 1 <= fuse <= MAX_FUSE):
        raise _fail(path, "fuse", f"{fuse!r} is not allowed; choose auto or an integer "
                    f"in [1, {MAX_FUSE}] (trials trained at once as one model)")
    checkpoint = _parse_checkpoint(path, raw.get("checkpoint", True))
    sampler = _options(path, "sampler", raw.get("sampler"), SAMPLERS, "tpe")
    pruner = _options(path, "pruner", raw.get("pruner"), PRUNERS, "median")
    if pruner.get("name") == "asha" and checkpoint is None:
        raise _fail(path, "checkpoint", "false is not allowed with pruner asha: a paused "
                    "trial goes on from its checkpoint when it is promoted; choose true or "
                    "{every: SECONDS}")

    data = {}
    for k, v in code["data"].items():
        if k in SPLIT_KEYS:
            data[k] = _check_train_value(path, f"data.{k}", k, v, base)
    base.update(data)

    settable = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SEARCHABLE]
    fixed = {}
    for k, v in _settable(path, "fixed", raw.get("fixed"), settable).items():
        fixed[k] = _check_train_value(path, f"fixed.{k}", k, v, base)
    base.update(fixed)

    space = {}
    for name_, value in _settable(path, "search_space", raw.get("search_space"),
                                  settable).items():
        if name_ in fixed:
            raise _fail(path, f"search_space.{name_}", "also given under fixed; keep one")
        parsed = _parse_param(path, name_, value, base)
        if isinstance(parsed, Param):
            space[name_] = parsed
        else:
            fixed[name_] = base[name_] = parsed
    if not space:
        raise _fail(path, "search_space", "nothing to search; give at least one range or "
                    "list of choices")
    _check_conditions(path, space, fixed)
    space = _parents_first(_add_implied_conditions(path, space, fixed))
    baseline = _parse_baseline(path, raw.get("baseline"), space, base)
    return Spec(name=name.strip(), path=path, text=text, task=task, model=model,
                description=str(raw.get("description", "")), metric=metric,
                direction=direction, seed=seed, sampler=sampler, pruner=pruner, budget=budget,
                storage=stores["storage"], tracking_uri=stores["tracking_uri"],
                resilience=resilience, fuse=fuse, model_kwargs=code["model_kwargs"],
                data_kwargs=code["data_kwargs"], loss=loss, metric_ref=metric_ref,
                code_dir=code["code_dir"], data=data, fixed=fixed, search_space=space,
                baseline=baseline, base=base, model_key=code["model_key"],
                checkpoint=checkpoint, registry=_parse_registry(path, raw, name.strip()))


def _parse_registry(path: Path, raw: dict, study: str) -> str | None:
    """`registry: {name: NAME}` (default: the study's name), `true`, or `false` (none)."""
    given = raw.get("registry", True)
    if isinstance(given, bool):
        return study if given else None
    name = _mapping(path, "registry", given, REGISTRY_KEYS).get("name", study)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _fail(path, "registry.name", f"{name!r} is not allowed: use 1 to 100 letters, "
                    "digits, '.', '_' or '-', starting with a letter or digit (it names the "
                    "model in MLflow's Model Registry: models:/NAME@champion)")
    return name


def _parse_checkpoint(path: Path, raw) -> float | str | None:
    """`checkpoint: false` (never), `true` (auto), or `{every: SECONDS | auto}`."""
    if isinstance(raw, bool):
        return "auto" if raw else None
    if not isinstance(raw, dict):
        raise _fail(path, "checkpoint", f"{raw!r} is not allowed; choose true, false, or "
                    "{every: SECONDS} (0: every epoch; auto: at most 2% of the time)")
    every = _mapping(path, "checkpoint", raw, CHECKPOINT_KEYS).get("every", "auto")
    try:
        return parse_every(every)
    except ValueError as exc:
        raise _fail(path, "checkpoint.every", str(exc)) from None


def _parse_budget(path: Path, raw: dict) -> Budget:
    budget_raw = _mapping(path, "budget", raw.get("budget"), BUDGET_KEYS)
    given = {}
    for key in ("n_trials", "epochs"):
        if key in budget_raw:
            given[key] = _number(path, f"budget.{key}", budget_raw[key], int)
    if budget_raw.get("timeout") is not None:
        given["timeout"] = _number(path, "budget.timeout", budget_raw["timeout"])
    if "report_every" in budget_raw:
        every = given["report_every"] = _number(path, "budget.report_every",
                                                budget_raw["report_every"])
        if not (0 < every <= 1 and abs(1 / every - round(1 / every)) < 0.05):
            raise _fail(path, "budget.report_every", f"{every!r} is not allowed; choose 1 "
                        "or a fraction 1/R of an epoch (0.5, 0.25, 0.1, ...)")
    budget = Budget(**given)
    for key in BUDGET_KEYS:
        value = getattr(budget, key)
        if value is not None and value <= 0:
            raise _fail(path, f"budget.{key}", f"{value} must be > 0")
    return budget


def _settable(path: Path, key: str, raw, settable: list[str]) -> dict:
    """A mapping of training values (`fixed`, `search_space`): the core's own names, and
    the model factory's arguments as model.NAME."""
    value = _mapping(path, key, raw)
    for k in value:
        if k not in settable and not (isinstance(k, str) and k.startswith(MODEL_PARAM)):
            raise _fail(path, f"{key}.{k}", f"unknown key; allowed: {', '.join(settable)}, "
                        "or model.NAME (an argument of the model factory)")
    return value


def _not_a_task(path: Path, task) -> SpecError:
    return _fail(path, "task", f"{task!r} is not allowed; choose one of: {', '.join(TASKS)}, "
                 "or name your own data under data.factory")


def _refused(path: Path, exc: ConfigError, task, model, loss) -> SpecError:
    """The core refused the task, the model or the loss (its rules decide); the line says
    it in the sweep file's words: your own data goes under data.factory, a model factory
    may take arguments, and which model goes with which task."""
    key, _, problem = str(exc).partition(": ")
    if key == "task":
        return _not_a_task(path, task)
    if key == "model" and isinstance(model, str) and model in MODELS:
        return _fail(path, key, f"{model!r} is not allowed for {task}; choose one of: "
                     f"{', '.join(MODELS_BY_TASK[task])}")
    if key == "model":
        return _fail(path, key, f"{model!r} is not allowed; choose one of: "
                     f"{', '.join(MODELS)}, or a factory: {{factory: module:callable}}")
    if key == "loss":
        choose = f"choose one of: {', '.join(LOSSES)}"
        return _fail(path, key, f"required with data.factory; {choose}" if loss is None
                     else f"{loss!r} is not allowed; {choose}")
    return _fail(path, key, problem)


def _parse_code(path: Path, raw: dict) -> dict:
    """task or data.factory, model (a name, or a factory with its arguments), loss. The
    core judges the task, the model and the loss (TrainConfig's rules); what the user's code
    takes is check.py's to find out."""
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
        if is_import_string(task):  # a sweep file names its own data under data.factory
            raise _not_a_task(path, task)
        for key in ("kwargs",):
            if key in data:
                raise _fail(path, f"data.{key}", "only with data.factory (your own data)")
    else:
        if not is_import_string(factory):
            raise _fail(path, "data.factory", f"{factory!r} is not an import string; write "
                        "it as module:function, e.g. my_data:load")
        task = factory
        _mapping(path, "data.kwargs", data.get("kwargs"))
    model_kwargs = {}
    model_key = "model"
    if isinstance(model_raw, dict):
        model, model_kwargs = model_raw["factory"], dict(
            _mapping(path, "model.kwargs", model_raw.get("kwargs")))
        model_key = "model.factory"
        if not is_import_string(model):
            raise _fail(path, "model.factory", f"{model!r} is not an import string; write it "
                        "as module:callable, e.g. my_models:build")
    elif model_raw is None and factory is not None:
        raise _fail(path, "model", "required with data.factory: {factory: "
                    "module:callable, kwargs: {...}}, or a built-in model "
                    f"({', '.join(MODELS)})")
    elif model_raw is None:  # the task's first model; an unknown task is the core's to refuse
        model = MODELS_BY_TASK[task][0] if isinstance(task, str) and \
            task in MODELS_BY_TASK else None
    else:
        model = model_raw
    loss = raw.get("loss")
    try:
        config = TrainConfig.from_dict({k: v for k, v in (("task", task), ("model", model),
                                                          ("loss", loss)) if v is not None})
    except ConfigError as exc:
        raise _refused(path, exc, task, model, loss) from None
    return {"task": task, "model": model, "model_kwargs": model_kwargs, "loss": loss,
            "loss_used": config.loss, "data_kwargs": dict(data.get("kwargs") or {}),
            "data": data, "code_dir": code_dir, "model_key": model_key}


def _parents_first(space: dict[str, Param]) -> dict[str, Param]:
    """Order the space so that a parameter comes after every parameter its `when` names,
    whatever order the file lists them in: a condition is checked against values already
    sampled."""
    def depth(name: str) -> int:
        parents = [p for p in space[name].when if p in space and p != name]
        return 1 + max(map(depth, parents)) if parents else 0

    return dict(sorted(space.items(), key=lambda item: depth(item[0])))
