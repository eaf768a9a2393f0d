"""A private single-node Slurm for tests: its own munge key and munged socket, slurm.conf, spool
directories and ports under a base directory; munged, slurmctld and slurmd started with explicit
paths (root only) and stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

import pytest

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slurm:
    base: str
    conf: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}

    def run(self, *argv: str) -> str:
        return subprocess.run(
            list(argv), env=self.env(), capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def log(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out"):
            try:
                with open(os.path.join(self.base, "log", name), errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-2000:]}")
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def start_slurm(base: str, cpus: int = 2) -> Slurm:
    if os.geteuid() != 0:
        pytest.skip("the test's slurmd runs jobs as root and must be root")
    missing = [d for d in DAEMONS if not os.path.exists(d)] + [
        c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None
    ]
    if missing:
        pytest.skip(f"slurm-wlm/munge are not installed: {', '.join(missing)}")
    for d in ("munge", "spool/ctld", "spool/d", "log"):
        os.makedirs(os.path.join(base, d), mode=0o700, exist_ok=True)
    key = os.path.join(base, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    sock = os.path.join(base, "munge", "munge.sock")
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(base, "slurm.conf")
    with open(conf, "w") as f:
        f.write(
            f"ClusterName=tvm{os.getpid()}\n"
            f"SlurmctldHost={host}(127.0.0.1)\n"
            f"SlurmctldPort={_free_port()}\nSlurmdPort={_free_port()}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge\n"
            f"StateSaveLocation={base}/spool/ctld\nSlurmdSpoolDir={base}/spool/d\n"
            f"SlurmctldPidFile={base}/slurmctld.pid\nSlurmdPidFile={base}/slurmd.pid\n"
            f"SlurmctldLogFile={base}/log/slurmctld.log\nSlurmdLogFile={base}/log/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
            "JobCompType=jobcomp/none\nSchedulerType=sched/builtin\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "ReturnToService=2\nMpiDefault=none\nSwitchType=switch/none\nMinJobAge=300\n"
            "KillWait=5\n"
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
    slurm = Slurm(base, conf)
    logdir = os.path.join(base, "log")

    def launch(argv: list[str], out: str) -> None:
        log = open(os.path.join(logdir, out), "ab")  # noqa: SIM115
        slurm.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=log, env=slurm.env(), start_new_session=True)
        )
        log.close()

    try:
        launch(
            [
                DAEMONS[0],
                "-F",
                "-f",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={logdir}/munged.log",
                f"--pid-file={base}/munge/munged.pid",
                f"--seed-file={base}/munge/seed",
            ],
            "munged.out",
        )
        _wait(lambda: os.path.exists(sock), "munged's socket", slurm)
        launch([DAEMONS[1], "-D", "-f", conf], "slurmctld.out")
        launch([DAEMONS[2], "-D", "-f", conf, "-N", host], "slurmd.out")
        _wait(lambda: _node_idle(slurm), "the Slurm node to be idle", slurm)
    except BaseException:
        slurm.stop()
        raise
    return slurm


def _node_idle(slurm: Slurm) -> bool:
    try:
        return "idle" in slurm.run("sinfo", "--noheader", "--format=%t")
    except subprocess.SubprocessError:
        return False


def _wait(cond, what: str, slurm: Slurm, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if any(p.poll() is not None for p in slurm.procs) or time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {what}: a Slurm daemon failed\n{slurm.log()}")
        time.sleep(0.2)
