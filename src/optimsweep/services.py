"""The servers a study needs to grow past one machine, one command away: a PostgreSQL for
Optuna's storage and an `mlflow server` (its records in the same PostgreSQL, serving the
artifacts) for the tracking. `make services` and the tests' fixture both start them here.

Everything lives in one git-ignored folder (`.services/` by default): the database cluster,
the artifacts, the logs, and the password. The password never goes into a URL: the URLs
name a libpq password file (`passfile=`), so nothing printed or stored holds a secret.
PostgreSQL refuses to run as root; as root it runs as Debian's `postgres` user.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from optimsweep.errors import ServiceError

DEFAULT_DIR = ".services"
USER = "optimsweep"
PG_PORT, MLFLOW_PORT = 55432, 5001



@dataclass
class Endpoints:
    """What a worker exports to join the study: no password in either."""

    storage: str  # OPTIMSWEEP_STORAGE
    tracking_uri: str  # MLFLOW_TRACKING_URI
    folder: str
    pg_port: int
    mlflow_port: int

    def database_url(self, database: str) -> str:
        return (f"postgresql://{USER}@127.0.0.1:{self.pg_port}/{database}"
                f"?passfile={Path(self.folder, 'pgpass')}")

    def with_password(self, url: str) -> str:
        """The same server, the password written in the URL (what a user of another machine
        would do): for checking that it is never stored or printed."""
        password = Path(self.folder, "password").read_text().strip()
        return url.split("?")[0].replace(f"{USER}@", f"{USER}:{password}@")

    def exports(self) -> str:
        return (f"export OPTIMSWEEP_STORAGE='{self.storage}'\n"
                f"export MLFLOW_TRACKING_URI='{self.tracking_uri}'")


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


def pg_tool(name: str) -> str:
    """A PostgreSQL client program of the installed server's version (pg_dump, psql)."""
    binaries = _pg_bin()
    if binaries is None:
        raise ServiceError("PostgreSQL is not installed")
    return str(binaries / name)


def _install_postgresql() -> Path:
    """Debian's `postgresql`, installed with apt-get when running as root."""
    binaries = _pg_bin()
    if binaries is not None:
        return binaries
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError("PostgreSQL is not installed (Debian: `apt-get install postgresql`, "
                           "as root)")
    print("installing Debian's postgresql ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"{' '.join(command)} failed: "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")
    binaries = _pg_bin()
    if binaries is None:
        raise ServiceError("apt-get installed postgresql, but no pg_ctl was found")
    return binaries


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _reachable_by_server_user(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    return subprocess.run(_as_server_user(["test", "-x", str(path)]),
                          capture_output=True).returncode == 0


def _run(command: list[str], what: str, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise ServiceError(f"{what} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(ready, seconds: float, what: str, log: Path) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if ready():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
    raise ServiceError(f"{what} did not come up within {seconds:.0f} s; {log}:\n{tail}")


def _start_postgres(folder: Path, port: int) -> None:
    binaries = _install_postgresql()
    data, log = folder / "postgres", folder / "postgres.log"
    if not _reachable_by_server_user(folder):
        raise ServiceError(f"{folder}: the `postgres` user can't reach this folder (a parent "
                           "is not searchable by others); use --dir somewhere it can")
    password_file = folder / "password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(24) + "\n")
        password_file.chmod(0o600)
    password = password_file.read_text().strip()
    passfile = folder / "pgpass"  # libpq's format; psycopg and the mlflow server read it
    passfile.write_text(f"127.0.0.1:{port}:*:{USER}:{password}\n")
    passfile.chmod(0o600)
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(mode=0o700)
        _own(data)
        pwfile = folder / ".initial-password"
        pwfile.write_text(password + "\n")
        _own(pwfile)
        try:
            _run(_as_server_user([str(binaries / "initdb"), "-D", str(data), "-U", USER,
                                  "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
                                  "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                 "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    if _pg_running(binaries, data):
        return
    log.touch()
    _own(log)
    # Loopback only; the socket in the data folder (Debian's /var/run/postgresql may not exist).
    options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data} "
               "-c max_connections=100")
    _run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o",
                          options, "-w", "-t", "60", "start"]), "pg_ctl start")


def _pg_running(binaries: Path, data: Path) -> bool:
    return subprocess.run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "status"]),
                          capture_output=True).returncode == 0


def _create_databases(endpoints: Endpoints, names: tuple[str, ...]) -> None:
    import psycopg

    with psycopg.connect(endpoints.database_url("postgres"), autocommit=True,
                         connect_timeout=10) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def _mlflow_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow(endpoints: Endpoints) -> None:
    """The tracking server, its records in PostgreSQL, serving artifacts from the folder.
    The backend URL goes by environment, not argv, where `ps` would show it."""
    folder = Path(endpoints.folder)
    if _mlflow_healthy(endpoints.mlflow_port):
        return
    if _port_open(endpoints.mlflow_port):
        raise ServiceError(f"port {endpoints.mlflow_port} is taken by something that is not "
                           "an MLflow server; pass --mlflow-port")
    log = folder / "mlflow.log"
    (folder / "artifacts").mkdir(exist_ok=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": endpoints.database_url("mlflow")}
    # MLflow's job runner (some ten Huey processes for its GenAI jobs, each importing MLflow)
    # would take CPU from the workers it serves; optimsweep submits no jobs.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(endpoints.mlflow_port),
             "--artifacts-destination", str((folder / "artifacts").resolve()),
             "--workers", "1"],  # one process answers every worker (and starts faster)
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # its own process group: stopped as one
    (folder / "mlflow.pid").write_text(str(process.pid))
    _wait(lambda: _mlflow_healthy(endpoints.mlflow_port) or process.poll() is not None,
          180, "the MLflow server", log)
    if process.poll() is not None:
        raise ServiceError(f"the MLflow server exited ({process.returncode}); see {log}")


def stop_mlflow(folder: Path | str) -> bool:
    pid_file = Path(folder) / "mlflow.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return False
    end = time.time() + 3  # then killed: its graceful shutdown waits on idle clients
    while time.time() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)
    pid_file.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:  # our own child (the fixture started it): no zombie left behind
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def start(folder: Path | str = DEFAULT_DIR, pg_port: int = PG_PORT,
          mlflow_port: int = MLFLOW_PORT) -> Endpoints:
    """Start (or find running) both servers; returns what workers export. Idempotent."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)  # the `postgres` user must reach its data folder inside
    endpoints = Endpoints(storage="", tracking_uri=f"http://127.0.0.1:{mlflow_port}",
                          folder=str(folder), pg_port=pg_port, mlflow_port=mlflow_port)
    endpoints.storage = endpoints.database_url("optuna")
    _start_postgres(folder, pg_port)
    _create_databases(endpoints, ("optuna", "mlflow"))
    start_mlflow(endpoints)
    (folder / "endpoints.json").write_text(json.dumps(asdict(endpoints)))
    return endpoints


def stop(folder: Path | str = DEFAULT_DIR) -> list[str]:
    """Stop both servers (their data stays); returns what was stopped."""
    folder = Path(folder).resolve()
    stopped = ["mlflow server"] if stop_mlflow(folder) else []
    binaries, data = _pg_bin(), folder / "postgres"
    if binaries is not None and (data / "PG_VERSION").exists() and _pg_running(binaries, data):
        _run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                              "stop"]), "pg_ctl stop")
        stopped.append("postgresql")
    return stopped


def restart_postgres(folder: Path | str) -> None:
    folder = Path(folder).resolve()
    binaries = _pg_bin()
    # With its log file: else the server would hold our output pipe open, and wait forever.
    _run(_as_server_user([str(binaries / "pg_ctl"), "-D", str(folder / "postgres"), "-l",
                          str(folder / "postgres.log"), "-m", "fast", "-w", "restart"]),
         "pg_ctl restart", timeout=120)


def connections(endpoints: Endpoints) -> dict[str, int]:
    """Open connections to the study's database by client (application_name)."""
    import psycopg

    with psycopg.connect(endpoints.database_url("postgres"), autocommit=True) as conn:
        rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                            "WHERE datname = 'optuna' GROUP BY application_name").fetchall()
    return {name: n for name, n in rows}
