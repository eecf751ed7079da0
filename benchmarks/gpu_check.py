"""The CUDA path, checked on a machine with GPUs (`make gpu-check`); the test suite cannot,
having none. It prints the machine, then:

1. a short FashionMNIST study with `--workers auto`: one worker per visible GPU; each trial's
   run must say it trained on `cuda:0` as its worker saw it, each worker (pid) on a GPU of
   its own, and every visible GPU used;
2. fused against alone on the GPU: four configs trained as one batched model and each
   trained alone must end within the fused tolerance (5% of loss, 1.5 points of accuracy);
3. a trial's training stopped after 2 of 4 epochs and resumed from its checkpoint ends with
   the same weights as one trained in one go (allclose on CUDA, whose kernels need not be
   bitwise repeatable).

Exit 0 when all hold; the last line says which failed. Keep its output with the date, the
commit and the machine: docs/guide/scaling-out.md quotes it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

from cpu import cpu_line

EPOCHS = 3


def study(folder: Path, n_trials: int) -> Path:
    path = folder / "gpu.yaml"
    path.write_text(yaml.safe_dump({
        "name": "gpu", "task": "fashion_mnist", "model": "mlp", "metric": "val_accuracy",
        "sampler": {"name": "random"}, "pruner": {"name": "none"}, "fuse": 1,
        "budget": {"n_trials": n_trials, "epochs": EPOCHS},
        "data": {"train_subset": 10000, "val_size": 5000},
        "storage": str(folder / "mlruns" / "optuna.journal"),
        "tracking_uri": f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        "search_space": {"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                         "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}}))
    return path


def check_placement(folder: Path, gpus: int) -> list[str]:
    path = study(folder, 2 * gpus)
    done = subprocess.run([sys.executable, "-m", "optimsweep.cli", "sweep", str(path),
                           "--workers", "auto", "--no-progress"], cwd=folder,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return [f"the study failed: {done.stderr.strip()[-500:]}"]
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpu")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("optimsweep.role") == "trial"]
    problems = []
    by_pid: dict[str, set[str]] = {}
    for run in runs:
        tags = run.data.tags
        print(f"  trial {tags['optimsweep.trial_number']}: pid {tags['optimsweep.pid']}, "
              f"{tags['optimsweep.device']} = GPU {tags['optimsweep.device_index']} "
              f"({tags['optimsweep.device_name']}, {tags.get('optimsweep.device_memory_gib')} "
              f"GiB), {run.info.status}")
        if tags["optimsweep.device"] != "cuda:0" or run.info.status != "FINISHED":
            problems.append(f"trial {tags['optimsweep.trial_number']} trained on "
                            f"{tags['optimsweep.device']}, {run.info.status}")
        by_pid.setdefault(tags["optimsweep.pid"], set()).add(tags["optimsweep.device_index"])
    if any(len(d) != 1 for d in by_pid.values()):
        problems.append(f"a worker trained on several GPUs: {by_pid}")
    used = [d for devices in by_pid.values() for d in devices]
    if len(set(used)) != len(used):
        problems.append(f"two workers shared a GPU: {by_pid}")
    if gpus > 1 and len(set(used)) != gpus:
        problems.append(f"{len(set(used))} of {gpus} GPUs used: {by_pid}")
    return problems


def check_fused() -> list[str]:
    from optimsweep.core.train import TrainConfig, fit, fit_group, load_data

    base = TrainConfig(task="fashion_mnist", model="mlp", epochs=EPOCHS, device="cuda",
                       train_subset=10000, val_size=5000)
    configs = [dataclasses.replace(base, optimizer=o, lr=lr, seed=s)
               for s, (o, lr) in enumerate([("sgd", 1e-2), ("momentum", 1e-2),
                                            ("adam", 1e-3), ("adam", 3e-3)])]
    data = load_data(base)
    problems = []
    for config, fused in zip(configs, fit_group(configs, data), strict=True):
        alone = fit(config, data)
        loss, acc = fused.final.val_loss, fused.final.val_accuracy
        print(f"  {config.optimizer} lr {config.lr}: fused val loss {loss:.4f} acc "
              f"{acc:.4f}; alone {alone.final.val_loss:.4f} {alone.final.val_accuracy:.4f}")
        if abs(loss - alone.final.val_loss) > 0.05 * alone.final.val_loss or \
                abs(acc - alone.final.val_accuracy) > 0.015:
            problems.append(f"fused {config.optimizer} lr {config.lr} is outside the tolerance")
    return problems


def check_resume(folder: Path) -> list[str]:
    from optimsweep.core import checkpoint
    from optimsweep.core.train import TrainConfig, fit, load_checkpoint, load_data

    config = TrainConfig(task="fashion_mnist", model="mlp", epochs=4, device="cuda",
                         optimizer="adam", lr=1e-3, train_subset=10000, val_size=5000)
    data = load_data(config)
    whole = fit(config, data).model.state_dict()
    path = folder / "resume.checkpoint"
    writer = checkpoint.Checkpointer(checkpoint.file_sink(path), 0)
    fit(config, data, on_epoch=lambda s: s.epoch >= 2, checkpointer=writer)  # stop after 2
    resumed = fit(config, data, resume=load_checkpoint(path, config)).model.state_dict()
    worst = max((a - resumed[k]).abs().max().item() for k, a in whole.items())
    print(f"  stopped after 2 of 4 epochs and resumed: largest difference {worst:.3g}")
    return [] if worst <= 1e-5 else [f"the resumed weights differ by {worst:.3g}"]


def main() -> int:
    print(cpu_line())
    if not torch.cuda.is_available():
        print("gpu-check: torch finds no CUDA device here; nothing to check")
        return 1
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    for i in range(gpus):
        props = torch.cuda.get_device_properties(i)
        print(f"  GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    problems = []
    with tempfile.TemporaryDirectory(prefix="optimsweep-gpu-") as tmp:
        for name, check in (("placement (--workers auto)", lambda: check_placement(
                Path(tmp), gpus)), ("fused against alone", check_fused),
                ("checkpoint and resume", lambda: check_resume(Path(tmp)))):
            print(f"{name}:", flush=True)
            found = check()
            problems += found
            print(f"  {'ok' if not found else 'FAILED: ' + '; '.join(found)}", flush=True)
    print("gpu-check: all hold" if not problems else f"gpu-check: {len(problems)} failed")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
