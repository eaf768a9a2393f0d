"""The slurm provisioner's jobs carry the agent's join token in a 0600 file only: sbatch exports its
own environment into the job (kept in slurmctld's spool, given to the agent on the compute node),
so the coordinator's secrets in its environment (`TVM_JOIN_TOKEN`, `TVM_KEY`, `PGPASSWORD`, a
`TVM_STORE` URL with a password) must not reach sbatch. A real private Slurm (root)."""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator

import pytest

from coordinator.runtime.provisioners.config import parse_provisioners
from coordinator.runtime.provisioners.slurm import SlurmProvisioner
from tests.provisioners.slurmctl import Slurm, start_slurm
from tests.provisioners.test_ssh_provisioner import _tvm_command


@pytest.fixture
def slurm(tmp_path) -> Iterator[Slurm]:  # noqa: ANN001
    cluster = start_slurm(str(tmp_path / "slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def work_dir() -> Iterator[str]:
    path = f"/var/tmp/tvm-slurm-env-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _spooled_files(slurm: Slurm) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(os.path.join(slurm.base, "spool")):
        out += [os.path.join(root, f) for f in files]
    return out


def test_the_coordinators_secrets_stay_out_of_the_slurm_job(
    slurm: Slurm, work_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = uuid.uuid4().hex
    for name, value in {
        "TVM_JOIN_TOKEN": f"join{secret}",
        "TVM_KEY": f"key{secret}",
        "PGPASSWORD": f"pg{secret}",
        "TVM_STORE": f"postgresql:///db?host=/run/x&password=url{secret}",
        "AWS_SECRET_ACCESS_KEY": f"aws{secret}",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TVM_HARMLESS_SETTING", "kept")
    spec = parse_provisioners(
        {
            "hpc": {
                "type": "slurm",
                "tvm": _tvm_command(),
                "work-dir": work_dir,
                "slurm-conf": slurm.conf,
                "time-limit": "00:10:00",
            }
        }
    ).named["hpc"]
    agent_token = f"agenttoken{uuid.uuid4().hex}"
    prov = SlurmProvisioner("hpc", spec, "ws://127.0.0.1:9/agent", agent_token)  # type: ignore[arg-type]
    try:
        (name,) = prov.start(1)
        token_file = os.path.join(work_dir, name, "token")
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        env_files: list[str] = []
        deadline = time.monotonic() + 30
        while not env_files and time.monotonic() < deadline:
            env_files = [p for p in _spooled_files(slurm) if os.path.basename(p) == "environment"]
            time.sleep(0.1)
        assert env_files, "slurmctld kept no environment file for the job"
        spooled = b"".join(open(p, "rb").read() for p in env_files)
        assert b"TVM_HARMLESS_SETTING=kept" in spooled  # the job's environment is there
        for p in _spooled_files(slurm):
            with open(p, "rb") as f:
                data = f.read()
            assert secret.encode() not in data, p
            assert agent_token.encode() not in data, p
    finally:
        prov.stop_all()
        deadline = time.monotonic() + 30
        while prov.jobs and time.monotonic() < deadline:
            prov.poll()
            time.sleep(0.2)
