"""Optuna samplers and pruners by name, built from a sweep file's options.

The spec validates its `sampler:` and `pruner:` sections with the same tables and functions
that build them, so what loads is what runs. Everything here takes plain options and the
search space, not a Spec.
"""

from __future__ import annotations

import inspect
import warnings
import zlib
from collections.abc import Mapping

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from optimsweep.sweep.asha import Asha
from optimsweep.util import values

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
    "asha": Asha,  # successive halving that pauses and promotes (asha.py), not Optuna's
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


def option_type_problem(value, annotation: str) -> str | None:
    """What is wrong with `value` for an option annotated `annotation`, or None. Types we
    can't check from YAML are left to the dry run in check.py. Options are passed on as
    written, so a value must already be of its type (no reading of strings)."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if not all(kind in values.KINDS for kind in kinds):
        return None
    if any(values.is_a(value, kind) for kind in kinds):
        return None
    return f"{value!r} is not {' or '.join(values.WORDS[kind] for kind in kinds)}"


def sampler_seed(base: int, *salt: int | str) -> int:
    """A seed in numpy's range, distinct for each salt: trial numbers, processes."""
    return zlib.crc32(repr((base, *salt)).encode()) % SEED_RANGE


def grid_space(search_space: Mapping) -> dict[str, list]:
    """{name: its grid points} of a search space ({name: Param}), in the space's order."""
    grid = {}
    for name, param in search_space.items():
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


def build_sampler(options: dict, *, seed: int | None,
                  grid: dict[str, list] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler a `sampler:` section names; the grid sampler also needs `grid`
    (grid_space of the search space)."""
    name = options.get("name", "tpe")
    options = {k: v for k, v in options.items() if k != "name"}
    if name == "grid":
        if grid is None:
            raise ValueError("the grid sampler needs the grid (grid_space of the search space)")
        return SAMPLERS[name](grid, seed=seed, **options)
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


def build_pruner(options: dict, *, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner a `pruner:` section names; `epochs` (the budget's) is hyperband's
    resource unless the section gives one."""
    name = options.get("name", "median")
    options = {k: v for k, v in options.items() if k != "name"}
    if name == "asha":  # checked here; the claim and the trial's life pause and promote
        Asha(**options)
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        options.setdefault("max_resource", epochs)
    if name == "percentile":
        options.setdefault("percentile", 50.0)
    return PRUNERS[name](**options)
