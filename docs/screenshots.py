"""The docs' screenshot of the MLflow UI (`make docs-screenshots`): a small FashionMNIST study
(the default sweep file, fewer trials and epochs, a 10k-image subset) run into a temporary
folder, `mlflow ui` serving it, and headless Chromium opening the address `optimsweep url`
prints: the trials side by side, best first, as charts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "mlflow-trials.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from playwright.sync_api import sync_playwright

    bin_ = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep = yaml.safe_load((ROOT / "sweeps" / "fashion_mnist.yaml").read_text())
        sweep["budget"] = {"n_trials": 8, "epochs": 3}
        sweep["data"]["train_subset"] = 10_000
        sweep["data"]["val_size"] = 2_000
        (folder / "fashion_mnist.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
        env = {**os.environ, "OPTIMSWEEP_DATA": str(ROOT / "data")}
        subprocess.run([str(bin_ / "optimsweep"), "sweep", "fashion_mnist.yaml",
                        "--no-progress"], cwd=folder, env=env, check=True)
        port = free_port()
        url = subprocess.run([str(bin_ / "optimsweep"), "url", "fashion_mnist.yaml", "--port",
                              str(port)], cwd=folder, env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        ui = subprocess.Popen([str(bin_ / "mlflow"), "ui", "--backend-store-uri",
                               "sqlite:///mlruns/mlflow.db", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1"], cwd=folder,
                              env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1900, "height": 950})
                page.goto(url)
                page.get_by_text("Model metrics").first.wait_for(timeout=60_000)
                page.get_by_text("trial 000").first.wait_for(timeout=60_000)
                time.sleep(3)  # the charts draw after the list
                # MLflow's assistant panel, open on the right, is left out of the picture.
                width = 1900
                assistant = page.get_by_text("MLflow Assistant")
                if assistant.count():
                    width = int(assistant.first.bounding_box()["x"]) - 60
                OUT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=OUT, clip={"x": 0, "y": 0, "width": width,
                                                "height": 950})
                browser.close()
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
