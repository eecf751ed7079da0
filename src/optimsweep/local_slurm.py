"""A real one-machine Slurm (munge, slurmctld, slurmd) kept in one folder, for trying the
job-array recipe where no cluster is at hand, and for the tests and the benchmark that run
it: `optimsweep services start --slurm`. Debian's `slurm-wlm` is installed with apt-get
when run as root. Nothing under /etc is touched: the commands find this cluster through
SLURM_CONF, and the daemons talk through a munge socket of the folder's own. The daemons run
as root (SlurmUser=root), as a one-person cluster does; no cgroups are needed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from optimsweep.errors import ServiceError

NODE = "localhost"
SBIN = Path("/usr/sbin")
KILL_WAIT = 30  # seconds between a job's SIGTERM and its SIGKILL, as Slurm's default

SLURMCTLD_PORT, SLURMD_PORT = 56817, 56818
# cred_expire: a requeued job may start again this + 1 s later (Slurm's default: 121 s);
# sched_interval: the scheduler then starts it within a second, not at its next pass.
# OverSubscribe=FORCE:2: two one-CPU tasks a core, so four array tasks run at once on two
# cores, as `--workers 4` does.
CONF = """\
ClusterName=optimsweep
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
PlugStackConfig={dir}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MailProg=/bin/true
ReturnToService=2
KillWait={kill_wait}
JobRequeue=1
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""


@dataclass(frozen=True)
class Cluster:
    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose Slurm commands reach this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            cwd: Path | None = None) -> str:
        done = subprocess.run(list(argv), env=self.environ(), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and done.returncode != 0:
            raise ServiceError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def exports(self) -> str:
        return f"export SLURM_CONF='{self.conf}'"


def _install() -> None:
    if all((SBIN / d).exists() for d in ("slurmctld", "slurmd", "munged")) and \
            shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError("Slurm is not installed (Debian: `apt-get install slurm-wlm "
                           "munge`, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm",
                  "munge"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"installing Slurm failed: {done.stderr.strip()[-300:]}")


def _hardware() -> str:
    """CPUs, boards, sockets, cores and threads as slurmd finds them (a node described
    otherwise is drained); memory left out: CR_CPU schedules no memory."""
    line = subprocess.run([str(SBIN / "slurmd"), "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    return " ".join(w for w in line.split()
                    if not w.startswith(("NodeName=", "RealMemory=")))


def start(folder: Path | str, ctl_port: int, d_port: int, timeout: float = 60) -> Cluster:
    """munged, slurmctld and slurmd for this folder, once the node takes jobs."""
    _install()
    if os.geteuid() != 0:
        raise ServiceError("the one-machine Slurm runs its daemons as root (SlurmUser=root)")
    try:
        return _start(Path(folder).resolve(), ctl_port, d_port, timeout)
    except subprocess.CalledProcessError as exc:
        stop(folder)
        said = (exc.stderr or b"").decode(errors="replace").strip()[-300:]
        raise ServiceError(f"{Path(exc.cmd[0]).name} did not start: {said or exc}") from exc


def _start(folder: Path, ctl_port: int, d_port: int, timeout: float) -> Cluster:
    cluster = Cluster(folder)
    for sub in ("munge", "state", "spool", "run", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge = folder / "munge"
    subprocess.run([str(SBIN / "munged"), "--force", f"--socket={munge}/munge.socket",
                    f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                    f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                   check=True, capture_output=True)
    cluster.conf.write_text(CONF.format(dir=folder, node=NODE, ctl_port=ctl_port,
                                        d_port=d_port, kill_wait=KILL_WAIT,
                                        hardware=_hardware()))
    (folder / "plugstack.conf").write_text("")  # not /etc/slurm's
    env = cluster.environ()
    subprocess.run([str(SBIN / "slurmctld"), "-i"], env=env, check=True, capture_output=True)
    subprocess.run([str(SBIN / "slurmd"), "-N", NODE], env=env, check=True,
                   capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).strip()
        if state == "idle":
            return cluster
        time.sleep(0.2)
    logs = "; ".join((folder / "log" / n).read_text()[-300:] for n in
                     ("slurmctld.log", "slurmd.log") if (folder / "log" / n).exists())
    stop(folder)
    raise ServiceError(f"the one-machine Slurm in {folder} did not come up: {logs}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def stop(folder: Path | str) -> list[str]:
    """Every job of the cluster killed, then its daemons stopped; what was running."""
    folder = Path(folder).resolve()
    cluster, stopped = Cluster(folder), []
    if not cluster.conf.exists():
        return stopped
    daemons = {n: _pid(folder / "run" / f"{n}.pid") for n in ("slurmd", "slurmctld")}
    try:
        jobs = cluster.run("squeue", "-h", "-o", "%A", check=False, timeout=5).split()
        if jobs:
            cluster.run("scancel", "--full", "--signal=KILL", *jobs, check=False, timeout=5)
            cluster.run("scancel", *jobs, check=False, timeout=5)
        cluster.run("scontrol", "shutdown", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for name, pid in daemons.items():
        if pid and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
        if pid:
            stopped.append(name)
    _kill_steps(cluster)
    munged = _pid(folder / "munge" / "munged.pid")
    if munged:
        try:
            os.kill(munged, signal.SIGTERM)
            if not _gone(munged):
                os.kill(munged, signal.SIGKILL)
            stopped.append("munged")
        except ProcessLookupError:
            pass
    return stopped


def _kill_steps(cluster: Cluster) -> None:
    """slurmstepd outlives slurmd: this cluster's (found by its SLURM_CONF) and what runs
    under it are killed."""
    mine = f"SLURM_CONF={cluster.conf}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "slurmstepd" or \
                    mine not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            pid = int(proc.name)
            os.kill(pid, signal.SIGSTOP)
            for child in _descendants(pid):
                os.kill(child, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [d for c in children for d in (*_descendants(c), c)]
