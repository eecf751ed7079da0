"""`make ui`: the MLflow UI, driven in real headless Chromium, shows a study's trial runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optimsweep.cli import main
from optimsweep.run.runner import run_sweep
from serving import free_port, wait_until_up
from sweeps import line_sweep, load

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (`make test` installs it as root)",
                allow_module_level=True)


@pytest.fixture
def ui(tmp_path):
    """A finished study and the MLflow UI serving its store, as `make ui` starts it."""
    spec = load(line_sweep(tmp_path, budget={"n_trials": 3, "epochs": 2}))
    study = run_sweep(spec, progress=False)
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", spec.tracking_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "ui.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", server, tmp_path / "ui.log", timeout=90)
        yield url, study, spec
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_browser_sees_the_trial_runs_and_a_metric(ui, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    url, study, spec = ui
    assert main(["url", str(spec.path), "--port", url.rsplit(":", 1)[1]]) == 0
    trials_view = capsys.readouterr().out.strip()
    assert trials_view.startswith(f"{url}/#/experiments/")
    experiment = study.user_attrs["mlflow_experiment_id"]
    trial = study.trials[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # The address `make ui` prints: the study's experiment, in the model-training view.
        page.goto(f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        parent = page.get_by_role("gridcell").filter(has_text="study line").first
        parent.wait_for(timeout=60_000)
        parent.get_by_role("button").click()  # expand the study's child runs
        for t in study.trials:
            page.get_by_text(f"trial {t.number:03d}").first.wait_for(timeout=30_000)
        page.screenshot(path=tmp_path / "experiment.png", full_page=True)
        page.get_by_text("trial 000").first.click()
        page.wait_for_url(f"**/runs/{trial.user_attrs['mlflow_run_id']}**")
        page.get_by_text("val_loss").first.wait_for(timeout=60_000)
        page.screenshot(path=tmp_path / "trial.png", full_page=True)

        # The address `sweep`, `export` and `make ui` print: the trials flat (no parent to
        # expand), best first by the study's metric, as charts.
        page.goto(trials_view)
        for t in study.trials:
            page.get_by_text(f"trial {t.number:03d}").first.wait_for(timeout=60_000)
        page.get_by_text(f"{len(study.trials)} matching runs").wait_for(timeout=30_000)
        page.get_by_text("Model metrics").first.wait_for(timeout=30_000)  # the chart view
        page.get_by_text("Sort: val_loss").wait_for(timeout=30_000)
        listed = page.get_by_text(re.compile(r"^trial \d{3}$")).all_inner_texts()
        page.screenshot(path=tmp_path / "charts.png", full_page=True)

        # The study's run shows its leaderboard as a table, a row per trial.
        parent = study.user_attrs["mlflow_parent_run_id"]
        page.goto(f"{url}/#/experiments/{experiment}/runs/{parent}/artifacts")
        page.get_by_text("leaderboard.json").first.click()
        for t in study.trials:
            page.get_by_text(t.user_attrs["mlflow_run_id"]).first.wait_for(timeout=30_000)
        page.screenshot(path=tmp_path / "leaderboard.png", full_page=True)
        browser.close()
    best_first = sorted(study.trials, key=lambda t: t.value)  # val_loss: the lowest first
    assert listed[:len(best_first)] == [f"trial {t.number:03d}" for t in best_first]
    assert (tmp_path / "charts.png").stat().st_size > 10_000
    assert (tmp_path / "experiment.png").stat().st_size > 10_000
    assert (tmp_path / "trial.png").stat().st_size > 10_000
