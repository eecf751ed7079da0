"""The search space in action: Optuna suggestions -> TrainConfig, conditional params included.

This is the one place where sampled values meet the training core's config.
"""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from optimsweep.core.train import CONFIG_DEFAULTS, TrainConfig
from optimsweep.sweep.spec import Param, Spec


def applies(param: Param, values: dict) -> bool:
    """True when every `when` condition holds for the values chosen so far."""
    return all(values.get(parent, CONFIG_DEFAULTS.get(parent)) in allowed
               for parent, allowed in param.when.items())


def _suggest(trial: optuna.Trial, name: str, dist):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise TypeError(f"{name}: unsupported distribution {dist!r}")


def suggest_config(trial: optuna.Trial, spec: Spec) -> TrainConfig:
    """Sample the spec's search space; a conditional parameter is only asked for (and so
    only recorded) when its condition holds."""
    values = spec.base_config()
    for param in spec.search_space.values():  # parents first: spec.py ordered them
        if applies(param, values):
            values[param.name] = _suggest(trial, param.name, param.distribution)
    return TrainConfig.from_dict(values)


def config_from_params(spec: Spec, params: dict) -> TrainConfig:
    """The TrainConfig a finished trial ran with, rebuilt from its recorded params."""
    return TrainConfig.from_dict({**spec.base_config(), **params})
