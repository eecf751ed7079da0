"""`mlflow models serve` as a deployment runs it: a real server process, here one whose
Python can't import optimsweep nor the user's package (a finder refuses them and notes
every attempt), answering POST /invocations."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REFUSER = '''
import sys

class _Refuse:
    """Stands for a machine where these packages are not installed."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            with open({log!r}, "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, _Refuse())
sys.path[:] = [p for p in sys.path if not any(p.startswith(h) for h in {hidden!r})]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url` answers 200; a server that exits or takes longer fails with its log."""
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:]) from None
            time.sleep(0.3)


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, folder: Path, *, blocked: tuple[str, ...],
           hidden: tuple[str, ...] = ()) -> Iterator[str]:
    """The server's base URL while `mlflow models serve -m MODEL_URI --env-manager local`
    runs with `blocked` packages unimportable and `hidden` folders off its path. On exit
    the server is stopped and no import of a blocked package may have been tried."""
    site = folder / "site"
    site.mkdir(parents=True)
    attempts = folder / "refused-imports.txt"
    (site / "sitecustomize.py").write_text(REFUSER.format(
        blocked=set(blocked), log=str(attempts), hidden=tuple(str(h) for h in hidden)))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": tracking_uri,
           # MLflow runs `uvicorn` by name: the venv's, as in an activated venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = folder / "serve.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, log, timeout=120)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert not attempts.exists(), attempts.read_text()


def invocations(url: str, inputs: np.ndarray) -> np.ndarray:
    """The server's answer to a batch, in MLflow's tensor request form."""
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps({"inputs": inputs.tolist()}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)
