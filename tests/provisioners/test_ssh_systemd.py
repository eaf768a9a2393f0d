"""The ssh provisioner's systemd path against a real system manager: the "host" is a private
systemd booted as PID 1 of its own namespaces (tests/provisioners/systemd_ns.py) with the test's
sshd running inside them, so `systemd-run` there makes a real transient unit. A pool grows to one
TVM as a unit, runs a task, shrinks to 0: the unit is gone and no agent process is left. A
non-root login (a lingering user with its own `systemd --user`) gets a unit of its user manager.
(`mode = "auto"` where no systemd runs: test_ssh_provisioner.py.)"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from coordinator.common import models as m
from coordinator.runtime.provisioners.config import parse_provisioners
from tests.harness import cluster_ctx
from tests.provisioners.hostprocs import CmdlineWatch, agent_pids, ready_made_venv
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
def login_user() -> Iterator[pwd.struct_passwd]:
    """A user made for the test (unique name, no home), removed at the end."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("making a user needs root and useradd")
    name = f"tvmsd{uuid.uuid4().hex[:10]}"
    # password "*": no password login, yet not a locked account (which sshd refuses)
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-p", "*", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-f", name], check=False, capture_output=True)


@pytest.fixture
def systemd_host(tmp_path) -> Iterator[tuple[SystemdNs, Sshd]]:  # noqa: ANN001
    ns = boot_systemd(str(tmp_path / "systemd"))
    proc = None
    # readable by the non-root users the tests log in as
    keys = f"/var/tmp/tvm-ssh-keys-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(keys, mode=0o755)
        server, proc = start_sshd(str(tmp_path / "sshd"), wrap=ns.enter(), keys_dir=keys)
        yield ns, server
    finally:
        stop_systemd(ns)  # ends everything in its namespace, sshd and its logins included
        if proc is not None:
            stop(proc)
        shutil.rmtree(keys, ignore_errors=True)


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


async def _grow_and_run(c, agent_dir: str) -> str:  # noqa: ANN001
    """Pool of one TVM by the `lab` provisioner; one task on it; the agent's name."""
    await c.client.pools.add(
        "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
    )

    async def idle() -> bool:
        pool = await c.client.pools.get("p")
        assert pool.resize_error is None, pool.resize_error.message
        return await c._idle("p", 1)

    await c.wait_for(idle, timeout=90, what="1 idle TVM over ssh")
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
            name = await _grow_and_run(c, agent_dir)
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


async def test_a_non_root_login_gets_a_unit_of_its_own_user_manager(
    nursery, tmp_path, login_user, systemd_host
):
    # (login_user first: it is removed after the namespace, and its processes, are gone)
    ns, server = systemd_host
    user = login_user
    ns.start_user_manager(user.pw_name, user.pw_uid, user.pw_gid)
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip(f"the non-root agent needs a python its user can run ({python})")
    # the user's own directory: its venv (the test's interpreter lives under /root) and agents
    home = f"/var/tmp/tvm-ssh-user-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(home, mode=0o755)
    try:
        tvm = ready_made_venv(os.path.join(home, "venv"), python)
        agents = os.path.join(home, "agents")
        os.mkdir(agents)
        os.chmod(agents, 0o1777)  # made by root for the user, as an admin would (not its own)
        section = _section(server, agents)
        section["lab"]["hosts"][0].update(user=user.pw_name, tvm=tvm)
        strict = {**section["lab"], "hosts": [{**section["lab"]["hosts"][0], "mode": "systemd"}]}
        section["strict"] = strict
        async with cluster_ctx(
            nursery, tmp_path, heartbeat_timeout=5.0, provisioners=parse_provisioners(section)
        ) as c:
            name = await _grow_and_run(c, agents)
            d = os.path.join(agents, name)
            with open(os.path.join(d, "mode")) as f:
                assert f.read().strip() == "systemd-user"
            (pid,) = agent_pids(d)
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert {int(u) for u in uids} == {user.pw_uid}
            with open(f"/proc/{pid}/cgroup") as f:
                # in the user manager's tree, not the system's
                cgroup = f.read()
            assert f"/tvm-test-user-{user.pw_uid}.service/app.slice/tvm-agent-{name}.service" in (
                cgroup
            )
            unit = f"tvm-agent-{name}.service"
            shown = ns.user_systemctl(user.pw_name, user.pw_uid, "show", "-p", "ActiveState", unit)
            assert shown.stdout.strip() == "ActiveState=active", shown.stderr

            await c.client.pools.resize("p", 0)
            await c.wait_for(
                lambda: not agent_pids(agents) and not os.listdir(agents),
                timeout=60,
                what="the user unit's agent stopped and its directory wiped",
            )
            shown = ns.user_systemctl(user.pw_name, user.pw_uid, "show", "-p", "LoadState", unit)
            assert shown.stdout.strip() == "LoadState=not-found", shown.stderr

            # a user that does not linger: its units would end with the ssh login that made
            # them, so mode = "systemd" refuses, naming the fix, and starts nothing
            assert ns.run("rm", f"/var/lib/systemd/linger/{user.pw_name}").returncode == 0
            await c.client.pools.add(
                "q",
                target_dedicated=1,
                metadata=[m.MetadataItem(name="provisioner", value="strict")],
            )

            async def refused():  # noqa: ANN202
                q = await c.client.pools.get("q")
                return q if q.resize_error is not None else None

            q = await c.wait_for(refused, timeout=30, what="the strict provisioner's error")
            assert q.resize_error.code == "AgentStartFailed"
            assert f"loginctl enable-linger {user.pw_name}" in q.resize_error.message
            assert os.listdir(agents) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)
