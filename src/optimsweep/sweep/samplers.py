"""Optuna samplers and pruners by name, built from a sweep file's options.

The spec validates its `sampler:` and `pruner:` sections with the same tables and functions
that build them, so what loads is what runs.
"""

from __future__ import annotations

import inspect
import math
import warnings
import zlib
from typing import TYPE_CHECKING

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

if TYPE_CHECKING:
    from optimsweep.sweep.spec import Spec

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
# Options the sweep sets itself, or that take Python objects rather than YAML values.
NOT_OPTIONS = {"self", "seed", "search_space", "independent_sampler", "gamma", "weights",
               "constraints_func", "source_trials"}
SEED_RANGE = 2**32  # numpy's generators, which the samplers use, take seeds below this


def allowed_options(cls) -> dict[str, str]:
    """{option: its annotation as text} for the YAML-valued options of a sampler or pruner."""
    params = inspect.signature(cls.__init__).parameters
    return {name: p.annotation if isinstance(p.annotation, str) else
            getattr(p.annotation, "__name__", str(p.annotation))
            for name, p in sorted(params.items())
            if name not in NOT_OPTIONS and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD)}


_TYPE_CHECKS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
              and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
}


def option_type_problem(value, annotation: str) -> str | None:
    """What is wrong with `value` for an option annotated `annotation`, or None. Types we
    can't check from YAML are left to the dry run in spec.py."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if not all(kind in _TYPE_CHECKS for kind in kinds):
        return None
    if any(_TYPE_CHECKS[kind][1](value) for kind in kinds):
        return None
    return f"{value!r} is not {' or '.join(_TYPE_CHECKS[kind][0] for kind in kinds)}"


def sampler_seed(base: int, *salt: int | str) -> int:
    """A seed in numpy's range, distinct for each salt: trial numbers, processes."""
    return zlib.crc32(repr((base, *salt)).encode()) % SEED_RANGE


def grid_space(spec: Spec) -> dict[str, list]:
    grid = {}
    for name, param in spec.search_space.items():
        dist = param.distribution
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step))
            grid[name] = [dist.low + i * dist.step for i in range(n + 1)]
        else:
            raise ValueError(f"grid needs every search_space entry to be categorical or a "
                             f"range with a step; {name} is a continuous range")
    return grid


def build_sampler(spec: Spec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler.get("name", "tpe")
    if name == "grid":
        return SAMPLERS[name](grid_space(spec), seed=seed, **options)
    if name == "tpe":
        # Conditional spaces: multivariate TPE with groups models each branch on its own.
        options.setdefault("multivariate", True)
        options.setdefault("group", options["multivariate"])
        # Trials running at once in other processes count as "liars", so parallel workers
        # don't all sample the same promising region.
        options.setdefault("constant_liar", True)
    with warnings.catch_warnings():  # "experimental" options are the ones worth using here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](seed=seed, **options)


def build_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    options = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner.get("name", "median")
    if name == "hyperband":
        options.setdefault("max_resource", spec.budget.epochs)
    if name == "percentile":
        options.setdefault("percentile", 50.0)
    return PRUNERS[name](**options)
