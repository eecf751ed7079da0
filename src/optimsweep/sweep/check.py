"""A parsed sweep file, checked by running what it names: the user's code is imported and
its arguments compared with the file's, the sampler and pruner are built, and a few trials
are asked of them in memory. Callers load sweep files here (`load_spec`, `parse_spec`), so
that bad input is refused before a study, a trial or an MLflow run exists.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from optimsweep.core.data import TASKS
from optimsweep.core.models import MODELS
from optimsweep.core.usercode import check_arguments, is_import_string, resolve
from optimsweep.errors import SpecError, UserCodeError
from optimsweep.records.optuna_adapter import never_stops
from optimsweep.sweep.samplers import build_pruner, build_sampler, grid_space
from optimsweep.sweep.space import applies, suggest_config
from optimsweep.sweep.spec import MODEL_PARAM, Spec, parse, read


def load_spec(path: Path | str) -> Spec:
    """The sweep file at `path`, parsed and checked."""
    return check(parse(read(path), path))


def parse_spec(text: str, path: Path | str = "<sweep>") -> Spec:
    """A sweep file's text (`path` names it in errors), parsed and checked."""
    return check(parse(text, path))


def check(spec: Spec) -> Spec:
    """Check what parsing can't: the user's code and the sampler. Returns `spec`."""
    _check_user_code(spec)
    _check_model_arguments(spec)
    sampler, pruner = _build(spec)
    _check_grid_baseline(spec)
    _dry_run(spec, sampler, pruner)
    return spec


def _fail(spec: Spec, key: str, problem: str) -> SpecError:
    return SpecError(f"{spec.path}: {key}: {problem}")


def _user_callable(spec: Spec, key: str, ref: str):
    try:
        return resolve(ref, spec.code_dir)
    except UserCodeError as exc:
        raise _fail(spec, key, str(exc)) from exc


def _check_user_code(spec: Spec) -> None:
    """Each import string resolves (with the sweep file's folder importable), and the data
    factory takes the arguments the file gives it."""
    if spec.task not in TASKS:
        fn = _user_callable(spec, "data.factory", spec.task)
        try:
            check_arguments(spec.task, fn, list(spec.data_kwargs))
        except UserCodeError as exc:
            raise _fail(spec, "data.kwargs", str(exc)) from None
    if is_import_string(spec.model):
        _user_callable(spec, spec.model_key, spec.model)
    if spec.metric_ref is not None:
        _user_callable(spec, "metric", spec.metric_ref)


def _check_model_arguments(spec: Spec) -> None:
    """The model factory takes every argument the file gives it, fixed or searched, and
    gets every argument it needs."""
    fn = resolve(MODELS.get(spec.model, spec.model), spec.code_dir)
    given = {**{k: "model.kwargs" for k in spec.model_kwargs},
             **{k[len(MODEL_PARAM):]: f"fixed.{k}" for k in spec.fixed
                if k.startswith(MODEL_PARAM)},
             **{k[len(MODEL_PARAM):]: f"search_space.{k}" for k in spec.search_space
                if k.startswith(MODEL_PARAM)}}
    for name, key in given.items():
        try:
            check_arguments(spec.model, fn, [name], complete=False)
        except UserCodeError as exc:
            raise _fail(spec, key, str(exc)) from None
    try:
        check_arguments(spec.model, fn, list(given))
    except UserCodeError as exc:
        raise _fail(spec, "model.kwargs", str(exc)) from None


def _build(spec: Spec) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    """The sampler and pruner, built once now, so bad options fail before any study
    exists; the dry run uses them."""
    try:
        grid = grid_space(spec.search_space) if spec.sampler.get("name") == "grid" else None
        sampler = build_sampler(spec.sampler, seed=0, grid=grid)
    except (TypeError, ValueError) as exc:
        raise _fail(spec, "sampler", str(exc)) from None
    try:
        pruner = build_pruner(spec.pruner, epochs=spec.budget.steps)
    except (TypeError, ValueError) as exc:
        raise _fail(spec, "pruner", str(exc)) from None
    return sampler, pruner


def _check_grid_baseline(spec: Spec) -> None:
    """The grid sampler runs baselines as grid points: each gives every parameter that
    applies to it, on the grid."""
    if spec.sampler.get("name") != "grid":
        return
    grid = grid_space(spec.search_space)
    for i, entry in enumerate(spec.baseline):
        values = {**spec.base_config(), **entry}
        missing = [n for n, p in spec.search_space.items()
                   if n not in entry and applies(p, values)]
        if missing:
            raise _fail(spec, f"baseline[{i}]", "the grid sampler needs every "
                        f"parameter of a baseline; missing: {', '.join(missing)}")
        for n, v in entry.items():
            if v not in grid[n]:
                raise _fail(spec, f"baseline[{i}].{n}", f"{v!r} is not a grid point;"
                            f" grid: {', '.join(map(str, grid[n]))}")


def _dry_run(spec: Spec, sampler: optuna.samplers.BaseSampler,
             pruner: optuna.pruners.BasePruner) -> None:
    """Ask the sampler and pruner for a few trials of this space (with the baselines first)
    in memory, with no training: option values that only fail when used, fail now."""
    base = spec.base_config()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A grid sampler stops studies: not ours to end here.
            study = never_stops(optuna.create_study(direction=spec.direction, sampler=sampler,
                                                    pruner=pruner))
            for params in spec.baseline:
                study.enqueue_trial(params)
            for i in range(len(spec.baseline) + 3):
                key = f"baseline[{i}]" if i < len(spec.baseline) else "sampler"
                trial = study.ask()
                try:
                    suggest_config(trial, spec.search_space, base)
                except Exception as exc:  # noqa: BLE001  (whatever it is, it is the file's)
                    raise _fail(spec, key, f"can't sample: {exc}") from None
                try:
                    for step in (1, 2):
                        trial.report(float(i + step), step)
                        trial.should_prune()
                except Exception as exc:  # noqa: BLE001
                    raise _fail(spec, "pruner", f"can't prune: {exc}") from None
                study.tell(trial, float(i))
    finally:
        optuna.logging.set_verbosity(verbosity)
