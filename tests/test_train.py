"""The shared training core: configs, optimizers, schedulers, determinism, divergence."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from optimsweep.core.train import (
    FUSED_GROUPS,
    GROUPS,
    OPTIMIZERS,
    SCHEDULERS,
    ConfigError,
    DivergedError,
    TrainConfig,
    fit,
    group_key,
)


def line_config(**overrides) -> TrainConfig:
    values = dict(task="regression", model="linear", optimizer="sgd", lr=0.01, batch_size=32,
                  epochs=20, seed=42)
    values.update(overrides)
    return TrainConfig(**values)


def test_regression_recovers_the_seed_line(line):
    """SGD with L1 loss finds weight 0.7 and bias 0.3, as in the seed."""
    result = fit(line_config(), line)
    assert result.model.weights.item() == pytest.approx(0.7, abs=0.02)
    assert result.model.bias.item() == pytest.approx(0.3, abs=0.02)
    assert result.test_loss < 0.02
    assert result.test_accuracy is None  # no accuracy for regression


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_and_scheduler_trains(line, optimizer, scheduler):
    """Each optimizer x scheduler lowers the validation loss and logs every epoch."""
    config = line_config(optimizer=optimizer, scheduler=scheduler, epochs=6, step_size=2)
    result = fit(config, line)
    assert [s.epoch for s in result.history] == list(range(1, 7))
    assert result.history[-1].val_loss < result.history[0].val_loss


def test_step_scheduler_decays_lr_every_step_size_epochs(line):
    """StepLR multiplies the learning rate by gamma every step_size epochs."""
    result = fit(line_config(scheduler="step", step_size=2, gamma=0.5, epochs=5), line)
    assert [s.lr for s in result.history] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


def test_cosine_scheduler_anneals_towards_zero(line):
    result = fit(line_config(scheduler="cosine", epochs=4), line)
    lrs = [s.lr for s in result.history]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in itertools.pairwise(lrs))


def test_plateau_scheduler_cuts_lr_when_val_loss_stalls(line):
    """With patience 0, any epoch without improvement cuts the rate by `factor`."""
    config = line_config(scheduler="plateau", factor=0.5, patience=0, lr=0.5, epochs=12)
    lrs = [s.lr for s in fit(config, line).history]
    assert min(lrs) < 0.5


def test_same_seed_same_result_on_cpu(fashion_small):
    """Two runs with one seed give identical curves and weights; another seed differs."""
    config = TrainConfig(optimizer="adam", lr=1e-3, epochs=2, batch_size=128, seed=7,
                         device="cpu", train_subset=2_000)
    a, b = fit(config, fashion_small), fit(config, fashion_small)
    assert [(s.train_loss, s.val_loss, s.val_accuracy) for s in a.history] == [
        (s.train_loss, s.val_loss, s.val_accuracy) for s in b.history]
    weights_a, weights_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    config.seed = 8
    assert fit(config, fashion_small).history[-1].val_loss != a.history[-1].val_loss


def test_on_epoch_sees_every_epoch_and_can_stop(line):
    """on_epoch gets train/val loss, lr and time; returning True stops after that epoch."""
    seen = []

    def watch(stats):
        seen.append(stats)
        return stats.epoch == 3

    result = fit(line_config(epochs=10), line, on_epoch=watch)
    assert result.stopped_early and len(result.history) == 3 and seen == result.history
    assert all(s.seconds > 0 and math.isfinite(s.train_loss) for s in seen)
    assert math.isfinite(result.test_loss)  # the test set is still reported


def test_non_finite_loss_raises_with_epoch_and_step(line):
    """A poisoned target makes the loss infinite at the first step."""
    line.train_y[:] = float("inf")
    with pytest.raises(DivergedError, match="epoch 1, step 1") as info:
        fit(line_config(), line)
    assert info.value.epoch == 1 and info.value.step == 1


def test_exploding_learning_rate_raises_diverged(fashion_small):
    config = TrainConfig(optimizer="momentum", lr=1e4, momentum=0.99, epochs=3,
                         train_subset=2_000, batch_size=64)
    with pytest.raises(DivergedError, match=r"epoch \d+, step \d+"):
        fit(config, fashion_small)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("optimizer", "lbfgs", "sgd, momentum, adam, adamw, rmsprop"),
        ("scheduler", "warmup", "none, step, plateau, cosine"),
        ("task", "cifar", "fashion_mnist, regression"),
        ("model", "resnet", "mlp, cnn"),
        ("device", "tpu", "auto, cpu, cuda"),
        ("lr", 0, "> 0"),
        ("lr", -1e-3, "> 0"),
        ("batch_size", 0, ">= 1"),
        ("batch_size", 1.5, "an integer"),
        ("epochs", 0, ">= 1"),
        ("momentum", 1.0, "[0, 1)"),
        ("weight_decay", -0.1, ">= 0"),
        ("lr", "fast", "a number"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert str(info.value).startswith(f"{field}:") and allowed in str(info.value)


def test_unknown_key_is_rejected_with_the_allowed_keys():
    with pytest.raises(ConfigError, match="learning_rate: not a training parameter.*lr"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_yaml_style_exponent_strings_are_numbers():
    """PyYAML reads 1e-4 as a string; the config still takes it as a float."""
    assert TrainConfig(lr="1e-4").lr == pytest.approx(1e-4)


def test_conditional_params_only_where_they_apply():
    sgd = TrainConfig(optimizer="sgd").active_params()
    momentum = TrainConfig(optimizer="momentum", scheduler="step").active_params()
    adam = TrainConfig(optimizer="adam", scheduler="plateau").active_params()
    assert "momentum" not in sgd and "beta1" not in sgd and "step_size" not in sgd
    assert momentum["momentum"] == 0.9 and "gamma" in momentum and "beta1" not in momentum
    assert "beta2" in adam and "patience" in adam and "momentum" not in adam
    adamw = TrainConfig(optimizer="adamw").active_params()
    rmsprop = TrainConfig(optimizer="rmsprop").active_params()
    assert "beta1" in adamw and "alpha" not in adamw and "weight_decay" in adamw
    assert rmsprop["alpha"] == 0.99 and "beta1" not in rmsprop and "momentum" not in rmsprop


def test_auto_device_is_cuda_only_when_present(line):
    result = fit(line_config(epochs=1, device="auto"), line)
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- field groups and group_key

# A value other than line_config()'s for every field: a new field must be added here too.
OTHER_VALUES = {
    "task": "my_data:load", "model": "my_models:build", "model_kwargs": {"hidden": 4},
    "data_kwargs": {"n": 10}, "loss": "mse", "metric": "my_metrics:f1", "code_dir": "/tmp",
    "optimizer": "adam", "lr": 0.1, "momentum": 0.5, "nesterov": True, "beta1": 0.5,
    "beta2": 0.5, "alpha": 0.5, "weight_decay": 0.1, "batch_size": 8, "epochs": 3,
    "scheduler": "step", "step_size": 2, "gamma": 0.5, "factor": 0.5, "patience": 3,
    "seed": 1, "device": "cpu", "precision": "bf16", "val_size": 50, "split_seed": 1,
    "train_subset": 10, "in_memory_mb": 1.0,
}


def test_every_field_declares_its_group():
    """A new TrainConfig field must say (with `_in`) which group it belongs to, or
    group_key would silently leave it out or in."""
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("group") in GROUPS, f"{f.name}: no group; declare it with _in"


def test_group_key_covers_exactly_the_data_model_and_hardware_fields():
    base = line_config()
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(TrainConfig):
        other = dataclasses.replace(base, **{f.name: OTHER_VALUES[f.name]})
        assert getattr(other, f.name) != getattr(base, f.name), f.name
        fused = f.metadata["group"] in FUSED_GROUPS
        assert (group_key(other) != group_key(base)) == fused, f.name
    assert group_key(line_config()) == group_key(base)
    assert hash(group_key(line_config(model_kwargs={"a": 1, "b": 2}))) == hash(
        group_key(line_config(model_kwargs={"b": 2, "a": 1})))


def test_field_order_is_that_of_params_and_config_files():
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [
        "task", "model", "model_kwargs", "data_kwargs", "loss", "metric", "code_dir",
        "optimizer", "lr", "momentum", "nesterov", "beta1", "beta2", "alpha", "weight_decay",
        "batch_size", "epochs", "scheduler", "step_size", "gamma", "factor", "patience",
        "seed", "device", "precision", "val_size", "split_seed", "train_subset",
        "in_memory_mb"]
