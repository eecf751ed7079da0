"""The Kubernetes example, checked for shape (no cluster runs here): an Indexed Job whose
pods run the same worker as a Slurm task, the stores' URLs from a Secret, the password only
in a mounted password file, and time enough after SIGTERM to close a trial."""

from __future__ import annotations

from pathlib import Path

import yaml

from optimsweep.slurm import stop_seconds
from optimsweep.sweep.check import load_spec

ROOT = Path(__file__).parents[1]
MANIFEST = ROOT / "examples" / "kubernetes" / "sweep-job.yaml"


def job() -> dict:
    (doc,) = list(yaml.safe_load_all(MANIFEST.read_text()))
    return doc


def test_it_is_an_indexed_job_of_workers_that_preemption_does_not_fail():
    spec = job()
    assert (spec["apiVersion"], spec["kind"]) == ("batch/v1", "Job")
    body = spec["spec"]
    assert body["completionMode"] == "Indexed"
    assert body["completions"] == body["parallelism"] >= 1
    (rule,) = body["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore"
    assert rule["onPodConditions"] == [{"type": "DisruptionTarget"}]
    assert body["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


def test_its_worker_is_the_sweep_command_on_one_gpu():
    (container,) = job()["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["optimsweep", "sweep"] and "--no-progress" in command
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert Path(command[2]).parent.as_posix() in mounted  # the sweep file is there


def test_the_stores_come_from_a_secret_and_the_password_from_a_file():
    pod = job()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("OPTIMSWEEP_STORAGE", "MLFLOW_TRACKING_URI"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "optimsweep-stores"
    (stores,) = [v for v in pod["volumes"] if "secret" in v]
    (item,) = stores["secret"]["items"]
    assert item["key"] == "pgpass" and item["mode"] & 0o077 == 0  # libpq refuses wider
    assert "passfile=/etc/optimsweep/pgpass" in MANIFEST.read_text()  # the URL names it


def test_the_grace_period_leaves_time_to_close_a_trial_of_the_default_study():
    grace = job()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= stop_seconds(load_spec(ROOT / "sweeps" / "fashion_mnist.yaml"))
