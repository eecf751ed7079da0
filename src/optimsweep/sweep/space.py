"""The search space in action: Optuna suggestions -> TrainConfig, conditional params included.

This is the one place where sampled values meet the training core's config.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from optimsweep.core.train import CONFIG_DEFAULTS, TrainConfig
from optimsweep.sweep.spec import Param


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


def suggest_config(trial: optuna.Trial, search_space: Mapping[str, Param],
                   base: dict) -> TrainConfig:
    """Sample a search space on top of the training values every trial shares (a spec's
    base_config()); a conditional parameter is only asked for (and so only recorded) when
    its condition holds."""
    values = dict(base)
    for param in search_space.values():  # parents first: spec.py ordered them
        if applies(param, values):
            values[param.name] = _suggest(trial, param.name, param.distribution)
    return TrainConfig.from_dict(values)


def config_from_params(base: dict, params: dict) -> TrainConfig:
    """The TrainConfig a finished trial ran with, rebuilt from its recorded params on top of
    the values every trial shares (a spec's base_config())."""
    return TrainConfig.from_dict({**base, **params})
