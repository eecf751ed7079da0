"""What users see, pinned: the fingerprint of every shipped sweep file and example, the params
and tags a trial's run gets, an export's `config.yaml` and `metrics.json`, and a study made
by an earlier version that resumes. Written before the code was reshaped; a change here is a
change users see, and the note of the commit that makes it says why.

`OPTIMSWEEP_WRITE_GOLDEN=1 pytest tests/test_golden.py` rewrites tests/golden/*.json."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from optimsweep.cli import main
from records import assert_invariant, load_study, run_cli
from sweeps import line_sweep, load

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("OPTIMSWEEP_WRITE_GOLDEN") == "1"
SHIPPED = sorted([*ROOT.glob("sweeps/*.yaml"), *ROOT.glob("examples/*/sweep.yaml")])
# Values that name this machine, process, moment or checkout: their keys are pinned, not
# their values.
VOLATILE_TAGS = {"mlflow.parentRunId", "optimsweep.best_run_id", "mlflow.user",
                 "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                 "optimsweep.host", "optimsweep.pid", "optimsweep.study_uid", "git_commit",
                 "python", "optimsweep", "torch", "torchvision", "optuna", "mlflow", "numpy",
                 "pandas", "optimsweep.device_name"}


def _golden(name: str, actual):
    path = GOLDEN / name
    if WRITE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    return json.loads(path.read_text())


def _tags(run) -> dict:
    return {k: ("<volatile>" if k in VOLATILE_TAGS else v) for k, v in run.data.tags.items()}


def test_shipped_sweep_files_keep_their_fingerprints():
    """A changed fingerprint would refuse every study users already have."""
    actual = {str(p.relative_to(ROOT)): load(p).fingerprint() for p in SHIPPED}
    assert actual == _golden("fingerprints.json", actual)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A small study with a baseline, a conditional parameter and a scheduler, swept once for
    the module (each test may run in a worker of its own, so none relies on another)."""
    tmp = tmp_path_factory.mktemp("golden")
    path = line_sweep(tmp, "golden", budget={"n_trials": 3, "epochs": 2},
                      search_space={
                          "optimizer": {"type": "categorical", "choices": ["sgd", "momentum"]},
                          "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
                          "momentum": {"type": "float", "low": 0.5, "high": 0.95},
                          "batch_size": {"type": "categorical", "choices": [16, 64]},
                          "scheduler": {"type": "categorical", "choices": ["none", "step"]},
                          "step_size": {"type": "int", "low": 1, "high": 2}},
                      baseline=[{"optimizer": "sgd", "lr": 0.01, "batch_size": 16,
                                 "scheduler": "none"}])
    assert main(["sweep", str(path), "--no-progress"]) == 0
    return tmp, path


def test_a_trials_run_keeps_its_params_and_tags(swept):
    tmp, path = swept
    spec = load(path)
    client, children, trials = assert_invariant(spec)
    runs = {r.data.tags["optimsweep.trial_number"]: r for r in children}
    actual = {number: {"params": run.data.params, "tags": _tags(run),
                       "metrics": sorted(run.data.metrics),
                       "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}
              for number, run in sorted(runs.items())}
    actual["trial user attrs"] = {t.number: sorted(t.user_attrs) for t in trials}
    actual["study user attrs"] = sorted(load_study(spec).user_attrs)
    parent = next(r for r in client.search_runs([children[0].info.experiment_id])
                  if r.data.tags["optimsweep.role"] == "study")
    actual["parent tags"] = {k: v for k, v in _tags(parent).items()
                             if k not in ("optimsweep.sweep_fingerprint", "optimsweep.storage")}
    actual["parent artifacts"] = sorted(
        a.path for d in client.list_artifacts(parent.info.run_id)
        for a in client.list_artifacts(parent.info.run_id, d.path))
    actual = json.loads(json.dumps(actual))  # as JSON keeps it: trial numbers as text
    assert actual == _golden("trial_runs.json", actual)


def test_an_export_keeps_its_config_and_metrics_files(swept, capsys):
    tmp, path = swept
    out = tmp / "export"
    assert run_cli(capsys, "export", path, "--out", out)[0] == 0
    config = (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mlflow_run_id", "exported_at"):
        metrics[key] = "<volatile>"
    metrics["provenance"]["sweep_file"] = Path(metrics["provenance"]["sweep_file"]).name
    for side in ("trained_with", "exported_with"):
        metrics["provenance"][side] = sorted(metrics["provenance"][side])
    metrics["final_epoch"] = sorted(metrics["final_epoch"])  # values: last bits vary by CPU
    metrics["val_loss"] = round(metrics["val_loss"], 4)
    config = re.sub(r"(?m)^code_dir: .*$", "code_dir: <volatile>", config)
    actual = {"config.yaml": config.replace(str(out), "<out>"), "metrics.json": metrics}
    assert actual == _golden("export.json", actual)


LEGACY = Path("/tmp/optimsweep-golden-legacy")  # where tests/golden/legacy was recorded


def test_a_study_made_by_an_earlier_version_resumes(capsys, monkeypatch):
    """tests/golden/legacy: a 2-trial study recorded by main at e963250 (its stores hold
    absolute artifact paths, so it is replayed where it was recorded)."""
    shutil.rmtree(LEGACY, ignore_errors=True)
    shutil.copytree(GOLDEN / "legacy", LEGACY)
    monkeypatch.chdir(LEGACY)
    spec = load(LEGACY / "legacy.yaml")
    before = {t.number: (t.params, t.value) for t in load_study(spec).trials}
    assert len(before) == 2
    code, out, err = run_cli(capsys, "sweep", "legacy.yaml", "--no-progress")
    assert code == 0, err
    client, children, trials = assert_invariant(spec)
    assert len(trials) == 4 and {t.number: (t.params, t.value) for t in trials[:2]} == before
    code, out, err = run_cli(capsys, "export", "legacy.yaml", "--out", LEGACY / "export")
    assert code == 0, err
    assert yaml.safe_load((LEGACY / "export" / "config.yaml").read_text())["task"] == "regression"
    assert MlflowClient(spec.tracking_uri).get_experiment_by_name("legacy") is not None
    shutil.rmtree(LEGACY, ignore_errors=True)
