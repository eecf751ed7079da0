"""Fused groups: several configs trained at once as one batched model, each member ending
where its config ends trained alone; members leave (pruned, diverged, failed) one by one."""

from __future__ import annotations

import io
import itertools
import json
import re
import signal
from pathlib import Path

import pytest
import torch

import test_train
from optimsweep.cli import main
from optimsweep.core.train import (
    OPTIMIZERS,
    SCHEDULERS,
    ConfigError,
    DivergedError,
    FitResult,
    TrainConfig,
    fit,
    fit_group,
)
from optimsweep.run.runner import run_sweep
from records import (
    DATA,
    assert_invariant,
    finish,
    load_study,
    run_script,
    start,
    wait_until,
)
from sweeps import fashion_sweep, line_sweep, load


def line_config(**overrides) -> TrainConfig:
    """test_train's seed line, shorter and on the CPU, where fused and alone can match."""
    return test_train.line_config(**{"epochs": 8, "device": "cpu", **overrides})


def mlp_config(**overrides) -> TrainConfig:
    values = dict(optimizer="adam", lr=1e-3, batch_size=64, epochs=2, device="cpu",
                  train_subset=2_000)
    values.update(overrides)
    return TrainConfig(**values)


def curves(result: FitResult) -> list[tuple]:
    return [(s.train_loss, s.val_loss, s.lr) for s in result.history]


def assert_same_training(fused: FitResult, alone: FitResult, rtol: float) -> None:
    assert len(fused.history) == len(alone.history)
    for got, want in zip(curves(fused), curves(alone), strict=True):
        assert got == pytest.approx(want, rel=rtol, abs=1e-7)
    fused_weights, alone_weights = fused.model.state_dict(), alone.model.state_dict()
    for name, weight in alone_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, rtol=rtol, atol=1e-6)
    assert fused.test_loss == pytest.approx(alone.test_loss, rel=rtol, abs=1e-7)


def test_every_optimizer_and_scheduler_fused_matches_torch_optim_alone(line):
    """Twelve members, one per optimizer x scheduler, each with its own lr and seed: every
    epoch's losses and learning rate, and the final weights, match the same config trained
    alone by torch.optim and torch.optim.lr_scheduler (rtol 1e-4)."""
    configs = [line_config(optimizer=opt, scheduler=sched, lr=0.005 * (1 + i), seed=i,
                           step_size=2, gamma=0.5, factor=0.5, patience=0)
               for i, (opt, sched) in enumerate(itertools.product(OPTIMIZERS, SCHEDULERS))]
    fused = fit_group(configs, line)
    for config, result in zip(configs, fused, strict=True):
        assert_same_training(result, fit(config, line), rtol=1e-4)
    assert len({curves(r)[-1] for r in fused}) == len(configs)  # they really differ


def test_the_tutorial_mlp_fused_ends_where_it_ends_alone(fashion_small):
    """Four MLP members (SGD, momentum, Adam, Adam with a plateau schedule) for two epochs.
    Batched matrix products round differently from single ones, and Adam's normalised steps
    carry that rounding on: the documented tolerance (docs/guide/sweep-file.md) is 1.5 points
    of accuracy and 5% of loss
    (SGD stays within 1e-4). With torch's AVX-512 kernels the members matched exactly; with
    its AVX2 kernels (an AVX2-only CPU) the Adam member at lr 1e-3 ended 2.7% of loss and
    0.79 points from its run alone."""
    configs = [mlp_config(optimizer="sgd", lr=0.05, seed=1),
               mlp_config(optimizer="momentum", lr=0.01, seed=2),
               mlp_config(optimizer="adam", lr=1e-3, seed=3),
               mlp_config(optimizer="adam", lr=3e-3, seed=4, scheduler="plateau")]
    for config, result in zip(configs, fit_group(configs, fashion_small), strict=True):
        alone = fit(config, fashion_small)
        rtol = 1e-4 if config.optimizer == "sgd" else 0.05
        for got, want in zip(curves(result), curves(alone), strict=True):
            assert got == pytest.approx(want, rel=rtol)
        assert result.test_accuracy == pytest.approx(alone.test_accuracy, abs=0.015)


def test_a_pruned_member_leaves_and_the_others_go_on(line):
    configs = [line_config(seed=s, lr=0.01 * (s + 1)) for s in range(3)]
    seen: list[list[int]] = [[], [], []]

    def watcher(k):
        def on_epoch(stats):
            seen[k].append(stats.epoch)
            return k == 1 and stats.epoch == 2  # the pruner stops member 1 after epoch 2
        return on_epoch

    results = fit_group(configs, line, [watcher(k) for k in range(3)])
    assert seen == [list(range(1, 9)), [1, 2], list(range(1, 9))]
    assert results[1].stopped_early and len(results[1].history) == 2
    assert results[1].test_loss == pytest.approx(fit(configs[1], line, lambda s: s.epoch == 2)
                                                 .test_loss, rel=1e-4)
    for k in (0, 2):
        assert not results[k].stopped_early
        assert_same_training(results[k], fit(configs[k], line), rtol=1e-4)


def test_a_diverging_member_fails_alone(fashion_small):
    """An exploding learning rate ends its member with DivergedError; the rest finish."""
    configs = [mlp_config(optimizer="momentum", lr=1e4, momentum=0.99, seed=1),
               mlp_config(seed=2)]
    diverged, healthy = fit_group(configs, fashion_small)
    assert isinstance(diverged, DivergedError)
    assert isinstance(healthy, FitResult) and len(healthy.history) == 2
    assert healthy.history[-1].val_accuracy > 0.6


def test_an_error_in_one_members_callback_ends_only_that_member(line):
    def broken(stats):
        raise OSError("tracking store full")

    results = fit_group([line_config(seed=0), line_config(seed=1)], line, [None, broken])
    assert isinstance(results[1], OSError) and "store full" in str(results[1])
    assert isinstance(results[0], FitResult) and len(results[0].history) == 8


def test_ctrl_c_ends_the_whole_group(line):
    def interrupt(stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_group([line_config(seed=0), line_config(seed=1)], line, [None, interrupt])


def test_members_own_their_weights_afterwards(fashion_small):
    """A member's state_dict is its own model's, not a view that would save the stack."""
    a, b = fit_group([mlp_config(seed=1, epochs=1), mlp_config(seed=2, epochs=1)],
                     fashion_small)
    sizes = []
    for result in (a, b):
        buffer = io.BytesIO()
        torch.save(result.model.state_dict(), buffer)
        sizes.append(buffer.tell())
    assert max(sizes) < 1.1 * 4 * sum(p.numel() for p in a.model.parameters())
    assert not torch.equal(a.model.state_dict()["linear_relu_stack.0.weight"],
                           b.model.state_dict()["linear_relu_stack.0.weight"])


def test_configs_that_cannot_share_batches_are_refused(line):
    with pytest.raises(ConfigError, match="fused group needs one .*batch_size"):
        fit_group([line_config(batch_size=32), line_config(batch_size=8)], line)


DENORMALS = """
import sys
sys.path.insert(0, sys.argv[2])            # benchmarks/: core_loops
import torch
from core_loops import load_fashion_mnist, train_epoch  # the core flushes denormals on import
if sys.argv[1] == "keep":
    torch.set_flush_denormal(False)        # before torch's worker threads start
from optimsweep.core.models import build_model
data = load_fashion_mnist(train_subset=2_000)
torch.manual_seed(0)
model = build_model("mlp")
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
generator = torch.Generator().manual_seed(0)
for epoch in range(1, 4):  # 750 steps of batch 8
    train_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, data.train_x, data.train_y, 8,
                generator, epoch)
state = torch.cat([s[key].flatten() for s in optimizer.state.values()
                   for key in ("exp_avg", "exp_avg_sq")])
denormal = (state != 0) & (state.abs() < torch.finfo(torch.float32).tiny)
with torch.inference_mode():
    accuracy = (model(data.val_x).argmax(1) == data.val_y).float().mean().item()
print(int(denormal.sum()), accuracy)
"""


def test_flushing_denormals_keeps_learning_and_removes_them(tmp_path):
    """Adam's moment estimates of weights whose gradients died out decay into denormal
    floats, which CPUs compute several times slower. A process using the core flushes them
    in every thread: its Adam state holds none, and it learns the same within noise as a
    process that keeps them. (Each is forked from the tests' server, which imported the core
    before it computed anything, as a process that imports it at start does.)"""
    script = tmp_path / "denormals.py"
    script.write_text(DENORMALS)

    def train(mode: str) -> tuple[int, float]:
        loops = Path(__file__).parents[1] / "benchmarks"
        denormals, accuracy = run_script(script, mode, loops, cwd=tmp_path).split()
        return int(denormals), float(accuracy)

    denormals_kept, accuracy_kept = train("keep")
    denormals_core, accuracy_core = train("core")
    assert denormals_kept > 10_000 and denormals_core == 0
    assert accuracy_core == pytest.approx(accuracy_kept, abs=0.01)


# ---------------------------------------------------------------- fused trials in sweeps

def test_a_fused_sweep_keeps_every_guarantee_of_a_sequential_one(tmp_path):
    """fuse: 4 with two batch sizes: trials of one batch size train together, each with its
    own run, curves, weights and pruning decision; the baseline runs first; the budget is
    exact; Optuna and MLflow stay 1:1."""
    baseline = {"optimizer": "sgd", "lr": 0.01, "batch_size": 16}
    path = line_sweep(tmp_path, fuse=4, budget={"n_trials": 8, "epochs": 4},
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
                      baseline=[baseline])
    run_sweep(load(path), progress=False)
    client, runs, trials = assert_invariant(load(path))
    assert len(trials) == 8 and trials[0].params == baseline
    assert trials[0].state.name == "COMPLETE" and trials[0].user_attrs["baseline"]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert {r.data.tags["optimsweep.precision"] for r in runs} == {"fp32"}
    fused = [int(r.data.tags["optimsweep.fused"]) for r in runs]
    assert max(fused) >= 2 and all(1 <= k <= 4 for k in fused)
    for run in runs:
        assert "state_dict.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
        epochs = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in epochs] == list(range(1, len(epochs) + 1))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_signal_mid_group_closes_every_members_run(tmp_path, signum):
    """Four trials training as one group: Ctrl-C fails all four (interrupted, uncounted),
    each with its FAILED run; SIGKILL leaves them for the next command, which does the same.
    The next sweep then spends the whole budget."""
    path = line_sweep(tmp_path, fuse=4, budget={"n_trials": 4, "epochs": 30},
                      search_space={"optimizer": {"type": "categorical",
                                                  "choices": ["sgd", "adam"]},
                                    "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1},
                                    "batch_size": 16})
    spec = load(path)

    def group_running():
        running = [t for t in load_study(spec).trials if t.state.name == "RUNNING"]
        return len(running) == 4 and all("mlflow_run_id" in t.user_attrs for t in running)

    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    wait_until(group_running, timeout=90, what="a group of four trials running")
    process.send_signal(signum)
    code, _, err = finish(process)
    if signum == signal.SIGINT:
        assert code == 130 and "Traceback" not in err
        trials = assert_invariant(spec)[2]
    else:
        run_sweep(load(path), n_trials=4, progress=False)  # repairs, then runs 4 again
        trials = assert_invariant(spec)[2]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert [t.number for t in interrupted] == [0, 1, 2, 3]
    assert all(t.state.name == "FAIL" for t in interrupted)
    if signum == signal.SIGINT:
        run_sweep(load(path), progress=False)
    trials = assert_invariant(spec)[2]
    assert len([t for t in trials if not t.user_attrs.get("interrupted")]) == 4


def test_an_exported_fused_trial_is_reproduced_by_train_config(tmp_path, capsys,
                                                               monkeypatch):
    """Three FashionMNIST trials fused; the best one exported and trained again alone with
    `optimsweep train --config`: the same accuracy within the documented tolerance."""
    monkeypatch.setenv("OPTIMSWEEP_DATA", str(DATA))
    path = fashion_sweep(tmp_path, fuse=3)
    study = run_sweep(load(path), progress=False)
    assert study.best_trial.user_attrs.get("test_accuracy") is not None
    assert main(["export", str(path), "--out", str(tmp_path / "best")]) == 0
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "best" / "config.yaml"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"Accuracy: ([\d.]+)%", printed).group(1)) / 100
    assert accuracy == pytest.approx(metrics["final_epoch"]["test_accuracy"], abs=0.015)


def test_bf16_autocasts_the_products_and_keeps_fp32_weights(fashion_small):
    """precision: bf16 learns as fp32 does (within 2 points after two epochs), alone and
    fused, and the weights and optimizer state stay fp32."""
    fp32 = fit(mlp_config(), fashion_small)
    alone = fit(mlp_config(precision="bf16"), fashion_small)
    fused = fit_group([mlp_config(precision="bf16"), mlp_config(precision="bf16", seed=1)],
                      fashion_small)[0]
    for result in (alone, fused):
        assert all(p.dtype == torch.float32 for p in result.model.parameters())
        assert result.test_accuracy == pytest.approx(fp32.test_accuracy, abs=0.02)
        assert result.history[-1].val_loss != fp32.history[-1].val_loss  # bf16 really ran
