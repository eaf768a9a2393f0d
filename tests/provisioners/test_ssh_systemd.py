"""The ssh provisioner's systemd path against a real system manager: the "host" is a private
systemd booted as PID 1 of its own namespaces (tests/provisioners/systemd_ns.py) with the test's
sshd running inside them, so `systemd-run` there makes a real transient unit. A pool grows to one
TVM as a unit, runs a task, shrinks to 0: the unit is gone and no agent process is left.
(`mode = "auto"` where no systemd runs: test_ssh_provisioner.py.)"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from coordinator.common import models as m
from coordinator.runtime.provisioners.config import parse_provisioners
from tests.harness import cluster_ctx
from tests.provisioners.hostprocs import CmdlineWatch, agent_pids
from tests.provisioners.sshd import Sshd, start_sshd, stop
from tests.provisioners.systemd_ns import SystemdNs, boot_systemd, stop_systemd

JOB = "job-0000000001"


@pytest.fixture
def agent_dir() -> Iterator[str]:
    # Outside tmp_path: task users must traverse to their directories (pytest's tmp is 0700).
    path = f"/var/tmp/tvm-ssh-sd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd_host(tmp_path) -> Iterator[tuple[SystemdNs, Sshd]]:  # noqa: ANN001
    ns = boot_systemd(str(tmp_path / "systemd"))
    proc = None
    try:
        server, proc = start_sshd(str(tmp_path / "sshd"), wrap=ns.enter())
        yield ns, server
    finally:
        stop_systemd(ns)  # ends everything in its namespace, sshd and its logins included
        if proc is not None:
            stop(proc)


def _tvm_command() -> str:
    tvm = os.path.join(os.path.dirname(os.sys.executable), "tvm")  # type: ignore[attr-defined]
    if not os.access(tvm, os.X_OK):
        pytest.skip(f"no tvm command beside this interpreter ({tvm}): install the package")
    return tvm


def _section(server: Sshd, agent_dir: str) -> dict:
    return {
        "lab": {
            "type": "ssh",
            "idle-stop-after": 0.5,
            "hosts": [
                {
                    "address": server.addresses[0],
                    "port": server.port,
                    "key-file": server.key_file,
                    "tvm": _tvm_command(),
                    "agent-dir": agent_dir,
                    "mode": "auto",
                }
            ],
        }
    }


def _unit(ns: SystemdNs, name: str) -> dict[str, str]:
    out = ns.run(
        "systemctl",
        "show",
        "-p",
        "LoadState,ActiveState,MainPID,ExecStart,Environment",
        f"tvm-agent-{name}.service",
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


async def _grow_run_shrink(c, agent_dir: str) -> str:  # noqa: ANN001
    """Pool of one TVM by the `lab` provisioner; one task on it; the agent's name."""
    await c.client.pools.add(
        "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
    )
    await c.wait_for(lambda: c._idle("p", 1), timeout=90, what="1 idle TVM over ssh")
    (tvm,) = await c.client.tvms.list("p")
    await c.client.workitems.add("wi", "p")
    await c.client.tasks.add_many("wi", JOB, [task_spec("t0", "/bin/sh -c 'echo hi; id -u'")])

    async def done():  # noqa: ANN202
        (t,) = await c.client.tasks.list("wi", JOB)
        return t if t.state == "completed" else None

    task = await c.wait_for(done, timeout=60, what="the task completed on the ssh TVM")
    assert task.execution_info.exit_code == 0
    assert task.tvm_info.tvm_name == tvm.name
    return tvm.agent_id


async def test_agent_runs_as_a_transient_unit_of_the_hosts_systemd_and_is_gone_after_shrink(
    nursery, tmp_path, systemd_host, agent_dir
):
    ns, server = systemd_host
    section = _section(server, agent_dir)
    async with cluster_ctx(
        nursery, tmp_path, heartbeat_timeout=5.0, provisioners=parse_provisioners(section)
    ) as c:
        with CmdlineWatch(c.rc.join_token) as watch:
            name = await _grow_run_shrink(c, agent_dir)
            d = os.path.join(agent_dir, name)
            with open(os.path.join(d, "mode")) as f:
                assert f.read().strip() == "systemd"  # auto chose the unit: systemd runs there
            assert not os.path.exists(os.path.join(d, "pid"))
            unit = _unit(ns, name)
            assert (unit["LoadState"], unit["ActiveState"]) == ("loaded", "active")
            assert c.rc.join_token not in unit["ExecStart"] + unit["Environment"]
            (pid,) = agent_pids(d)
            with open(f"/proc/{pid}/cgroup") as f:
                # the agent is the unit's process, in the unit's cgroup of that systemd
                assert f"/system.slice/tvm-agent-{name}.service" in f.read()

            await c.client.pools.resize("p", 0)
            await c.wait_for(
                lambda: not agent_pids(agent_dir) and not os.listdir(agent_dir),
                timeout=60,
                what="the unit's agent stopped and its directory wiped",
            )
            # --collect: a stopped transient unit is unloaded, not left behind as failed
            assert _unit(ns, name)["LoadState"] == "not-found"
        assert watch.scans > 10
        assert watch.hits == []  # the join token was never on any command line on the "host"
