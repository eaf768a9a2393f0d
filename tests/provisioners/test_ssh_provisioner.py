"""The ssh provisioner against a real sshd on loopback (its own host key, config and authorized
key): a pool grows to 2 TVMs on two "hosts" (two loopback addresses of that sshd), runs tasks,
shrinks to 0, and no agent process or directory is left behind; the join token is on no command
line meanwhile. A host nobody listens on, one that refuses the key, shows a host key other than
the pinned one, lacks the `tvm` command or is told to use a systemd it lacks shows up in the
pool's resize error, named, leaving nothing there. The sshd runs where no systemd runs
(NO_SYSTEMD), so `mode = "auto"` must start plain processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from coordinator.common import models as m
from coordinator.runtime.provisioners.config import parse_provisioners
from tests.harness import REPO, cluster_ctx
from tests.provisioners.hostprocs import CmdlineWatch, agent_pids
from tests.provisioners.sshd import Sshd

TVM = os.path.join(os.path.dirname(os.path.realpath(os.sys.executable)), "tvm")  # type: ignore[attr-defined]
JOB = "job-0000000001"


@pytest.fixture
def agent_dir() -> Iterator[str]:
    # Outside tmp_path: task users must traverse to their directories (pytest's tmp is 0700).
    path = f"/var/tmp/tvm-ssh-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tvm_command() -> str:
    tvm = os.path.join(os.path.dirname(os.sys.executable), "tvm")  # type: ignore[attr-defined]
    if not os.access(tvm, os.X_OK):
        pytest.skip(f"no tvm command beside this interpreter ({tvm}): install the package")
    return tvm


def _ssh_section(
    sshd: Sshd, agent_dir: str, hosts: list[tuple[str, int]], mode: str = "process"
) -> dict:
    return {
        "lab": {
            "type": "ssh",
            "idle-stop-after": 0.5,
            "hosts": [
                {
                    "address": address,
                    "port": port,
                    "user": "root",
                    "key-file": sshd.key_file,
                    "tvm": _tvm_command(),
                    "agent-dir": agent_dir,
                    "mode": mode,
                }
                for address, port in hosts
            ],
        }
    }


async def test_pool_grows_over_ssh_runs_tasks_and_shrinks_to_nothing(
    nursery, tmp_path, sshd, agent_dir, caplog
):
    caplog.set_level(logging.INFO, logger="tvm.coordinator")
    section = _ssh_section(sshd, agent_dir, [(a, sshd.port) for a in sshd.addresses], "auto")
    async with cluster_ctx(
        nursery, tmp_path, heartbeat_timeout=5.0, provisioners=parse_provisioners(section)
    ) as c:
        with CmdlineWatch(c.rc.join_token) as watch:
            await c.client.pools.add(
                "p",
                target_dedicated=2,
                metadata=[m.MetadataItem(name="provisioner", value="lab")],
            )
            await c.wait_for(lambda: c._idle("p", 2), timeout=90, what="2 idle TVMs over ssh")
            tvms = await c.client.tvms.list("p")
            agents = sorted(t.agent_id for t in tvms)
            # one agent per host entry, each with its own directory on the "host"
            assert [a.rsplit("-", 1)[0] for a in agents] == ["lab-0", "lab-1"]
            assert sorted(os.listdir(agent_dir)) == agents
            for name in agents:
                token = os.path.join(agent_dir, name, "token")
                assert os.stat(token).st_mode & 0o777 == 0o600
                with open(os.path.join(agent_dir, name, "mode")) as f:
                    assert f.read() == "process\n"  # auto, and no systemd runs there
                # ... and the log says so, and why
                said = [
                    r.getMessage() for r in caplog.records if f"agent {name} on " in r.getMessage()
                ]
                assert said, caplog.text
                assert "a plain process, not a systemd unit: no systemd runs on the host" in said[0]
                with open(os.path.join(agent_dir, name, "pid")) as f:
                    # the recorded pid is the agent itself (exec'd), what stop signals
                    assert agent_pids(os.path.join(agent_dir, name)) == [int(f.read())]
                for pid in agent_pids(os.path.join(agent_dir, name)):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        assert c.rc.join_token.encode() not in f.read()  # never on a command line
            assert len(agent_pids(agent_dir)) == 2

            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many(
                "wi",
                JOB,
                [
                    task_spec(f"t{i}", "/bin/sh -c 'echo hello from $WATASK_TVM_NAME'")
                    for i in range(6)
                ],
            )
            done = await c.wait_for(
                lambda: _all_done(c), timeout=60, what="6 tasks completed on the ssh TVMs"
            )
            assert all(t.execution_info.exit_code == 0 for t in done)
            assert {t.tvm_info.tvm_name for t in done} <= {t.name for t in tvms}

            await c.client.pools.resize("p", 0)
            await c.wait_for(
                lambda: not agent_pids(agent_dir) and not os.listdir(agent_dir),
                timeout=60,
                what="every ssh agent stopped and its directory wiped",
            )
            await c.wait_for(lambda: _steady_empty(c), what="pool steady at 0")
            assert not any(a in c.rc.service.core.agents for a in agents)
    assert not agent_pids(agent_dir)
    # sampled all along: starts, tasks, stops; the token was on no process's command line
    assert watch.scans > 10
    assert watch.hits == []


async def test_unreachable_host_is_named_in_the_pools_resize_error(
    nursery, tmp_path, sshd, agent_dir
):
    from tests.harness import free_port

    dead = free_port()  # nothing listens there
    section = _ssh_section(sshd, agent_dir, [("127.0.0.1", dead)])
    async with cluster_ctx(nursery, tmp_path, provisioners=parse_provisioners(section)) as c:
        await c.client.pools.add(
            "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
        )
        pool = await c.wait_for(lambda: _with_error(c, "p"), timeout=30, what="a resize error")
        assert pool.resize_error.code == "HostUnreachable"
        assert f"root@127.0.0.1:{dead}" in pool.resize_error.message
        assert pool.allocation_state == "steady"
        assert pool.current_dedicated == 0
        # a pool naming a provisioner the coordinator does not define says so too
        await c.client.pools.add(
            "q", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="nope")]
        )
        q = await c.wait_for(lambda: _with_error(c, "q"), timeout=30, what="a resize error")
        assert q.resize_error.code == "UnknownProvisioner"
        assert "'nope'" in q.resize_error.message
    assert not os.path.exists(agent_dir) or not os.listdir(agent_dir)


async def test_hosts_that_refuse_the_key_show_another_or_lack_tvm_are_named_leaving_nothing(
    nursery, tmp_path, sshd, agent_dir
):
    import subprocess

    wrong = str(tmp_path / "not_authorized")
    subprocess.run(  # noqa: ASYNC221 - before any of the test's async work starts
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", wrong], check=True
    )
    section = _ssh_section(sshd, agent_dir, [(sshd.addresses[1], sshd.port)])
    section["lab"]["hosts"][0]["key-file"] = wrong
    # and a host that logs in but has no `tvm` where the entry says
    missing = f"/nonexistent-{uuid.uuid4().hex[:8]}/bin/tvm"
    other = _ssh_section(sshd, agent_dir, [(sshd.addresses[0], sshd.port)])["lab"]
    section["notvm"] = {**other, "hosts": [{**other["hosts"][0], "tvm": missing}]}
    # and one told to use systemd where none runs: fails after the agent's directory (with the
    # token) was made, which must go again
    section["nosd"] = {**other, "hosts": [{**other["hosts"][0], "mode": "systemd"}]}
    # and a host whose key is not the one known for it (known-hosts pins another): refused
    impostor = str(tmp_path / "impostor_host_key")
    subprocess.run(  # noqa: ASYNC221 - before any of the test's async work starts
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", impostor], check=True
    )
    known = tmp_path / "known_hosts"
    with open(impostor + ".pub") as f:
        known.write_text(f"[{sshd.addresses[0]}]:{sshd.port} {f.read()}")
    section["pinned"] = {**other, "hosts": [{**other["hosts"][0], "known-hosts": str(known)}]}
    async with cluster_ctx(nursery, tmp_path, provisioners=parse_provisioners(section)) as c:
        await c.client.pools.add(
            "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
        )
        await c.client.pools.add(
            "q", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="notvm")]
        )
        q = await c.wait_for(lambda: _with_error(c, "q"), timeout=30, what="a resize error")
        assert q.resize_error.code == "AgentStartFailed"
        assert f"root@{sshd.addresses[0]}:{sshd.port}" in q.resize_error.message
        assert f"no tvm command at {missing}" in q.resize_error.message
        await c.client.pools.add(
            "r", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="nosd")]
        )
        r = await c.wait_for(lambda: _with_error(c, "r"), timeout=30, what="a resize error")
        assert r.resize_error.code == "AgentStartFailed"
        assert f"root@{sshd.addresses[0]}:{sshd.port}" in r.resize_error.message
        assert os.listdir(agent_dir) == []  # its directory and token file removed again
        await c.client.pools.add(
            "s", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="pinned")]
        )
        pool_s = await c.wait_for(lambda: _with_error(c, "s"), timeout=30, what="a resize error")
        assert pool_s.resize_error.code == "HostUnreachable"
        assert f"root@{sshd.addresses[0]}:{sshd.port}" in pool_s.resize_error.message
        assert "Host key verification failed" in pool_s.resize_error.message
        pool = await c.wait_for(lambda: _with_error(c, "p"), timeout=30, what="a resize error")
        assert pool.resize_error.code == "HostUnreachable"
        assert f"root@{sshd.addresses[1]}:{sshd.port}" in pool.resize_error.message
        assert "Permission denied" in pool.resize_error.message
        assert (pool.allocation_state, pool.current_dedicated) == ("steady", 0)
        assert c.rc.service.provisioner.plugins["lab"].agents == {}
        assert c.rc.service.provisioner.plugins["notvm"].agents == {}
        assert c.rc.service.provisioner.plugins["nosd"].agents == {}
        assert c.rc.service.provisioner.plugins["pinned"].agents == {}
    assert os.listdir(agent_dir) == []


async def test_an_agent_dir_another_user_could_swap_is_refused(nursery, tmp_path, sshd, agent_dir):
    """An agent-dir that belongs to another user (who could rename the agent's directory between
    its mkdir and the token's write) is refused, named in the resize error; nothing is written
    into it."""
    os.makedirs(agent_dir)
    os.chown(agent_dir, 65534, 65534)
    os.chmod(agent_dir, 0o777)
    section = _ssh_section(sshd, agent_dir, [(sshd.addresses[0], sshd.port)])
    async with cluster_ctx(nursery, tmp_path, provisioners=parse_provisioners(section)) as c:
        await c.client.pools.add(
            "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
        )
        pool = await c.wait_for(lambda: _with_error(c, "p"), timeout=30, what="a resize error")
        assert pool.resize_error.code == "AgentStartFailed", pool.resize_error
        assert f"root@{sshd.addresses[0]}:{sshd.port}" in pool.resize_error.message
        assert f"agent-dir {agent_dir} belongs to another user" in pool.resize_error.message
        assert "uid: 65534" in pool.resize_error.message
        assert c.rc.service.provisioner.plugins["lab"].agents == {}
    assert os.listdir(agent_dir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the check as another user (needs root)")
def test_a_login_refuses_an_agent_dir_others_may_write_without_a_sticky_bit(agent_dir):
    """The start script's check (the script up to the agent directory's mkdir), run as a login
    other than root (setpriv): a root-owned agent-dir writable by others is refused unless it has
    the sticky bit."""
    import subprocess

    from coordinator.runtime.provisioners.ssh import SshHost, SshProvisioner

    os.makedirs(agent_dir)
    host = SshHost(address="h", tvm="/bin/true", agent_dir=agent_dir, mode="process")
    holder = type("P", (), {"agent_url": "ws://127.0.0.1:1/agent"})()
    script = SshProvisioner._start_script(holder, host, "n1")  # type: ignore[arg-type]
    # up to the agent directory's mkdir: what follows would start an agent
    script = script.split("\numask 077\n")[0] + "\necho passed\n"
    for mode, refused in ((0o777, True), (0o775, True), (0o1777, False), (0o755, False)):
        os.chmod(agent_dir, mode)
        run = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script],
            capture_output=True,
            text=True,
            cwd="/",
            input="token\n",
            timeout=30,
        )
        if refused:
            assert run.returncode == 3, (oct(mode), run.stderr)
            assert "writable by other users and has no sticky bit" in run.stderr, run.stderr
        else:
            assert (run.returncode, run.stdout) == (0, "passed\n"), (oct(mode), run.stderr)
    assert os.listdir(agent_dir) == []


async def _with_error(c, pool: str):  # noqa: ANN001, ANN202
    p = await c.client.pools.get(pool)
    return p if p.resize_error is not None else None


async def _all_done(c):  # noqa: ANN001, ANN202
    tasks = await c.client.tasks.list("wi", JOB)
    return tasks if len(tasks) == 6 and all(t.state == "completed" for t in tasks) else None


async def _steady_empty(c) -> bool:  # noqa: ANN001
    p = await c.client.pools.get("p")
    return (
        p.allocation_state == "steady"
        and p.current_dedicated == 0
        and not await c.client.tvms.list("p")
    )


assert REPO  # the agents run the installed `tvm` (an editable install of this checkout)


async def test_an_agent_killed_on_its_host_is_wiped_and_replaced(
    nursery, tmp_path, sshd, agent_dir
):
    import signal

    section = _ssh_section(sshd, agent_dir, [(sshd.addresses[0], sshd.port)])
    async with cluster_ctx(
        nursery,
        tmp_path,
        heartbeat_timeout=5.0,
        link_grace=0.5,
        unknown_tvm_timeout=1.0,
        provisioners=parse_provisioners(section),
    ) as c:
        c.rc.service.provisioner.lost_after = 1.0
        await c.client.pools.add(
            "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
        )
        await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="1 idle TVM over ssh")
        (first,) = [t.agent_id for t in await c.client.tvms.list("p")]
        group = _pool_group(agent_dir, first)
        (pid,) = agent_pids(os.path.join(agent_dir, first))
        os.kill(pid, signal.SIGKILL)  # the host's agent dies; max-agents = 1 on the only host
        await c.wait_for(
            lambda: _replaced(c, first), timeout=60, what="a new agent's TVM in the pool"
        )
        await c.wait_for(
            lambda: not os.path.exists(os.path.join(agent_dir, first)),
            what="the dead agent's directory wiped",
        )
        assert first not in c.rc.service.core.agents
        assert not _group_exists(group), f"the dead agent's pool group {group} was left"


def _pool_group(agent_dir: str, agent: str) -> str:
    """The pool group an agent made, named in its root (as root, agents have task users: one)."""
    from tvmagent.pool_isolation import POOL_GROUP_FILE

    path = os.path.join(agent_dir, agent, "root", POOL_GROUP_FILE)
    name = ""
    if os.path.exists(path):
        with open(path) as f:
            name = f.read().strip()
    assert name or os.geteuid() != 0, "a root agent with task users made no pool group"
    return name


def _group_exists(name: str) -> bool:
    import grp

    if not name:
        return False
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


async def _replaced(c, first: str) -> bool:  # noqa: ANN001
    tvms = await c.client.tvms.list("p")
    return len(tvms) == 1 and tvms[0].agent_id != first and tvms[0].state == "idle"


async def test_a_stopped_agent_whose_tvm_left_is_stopped_over_ssh_and_replaced(
    nursery, tmp_path, sshd, agent_dir
):
    """SIGSTOPped on its host past the heartbeat timeout: once its TVM leaves the pool the
    coordinator has the provisioner stop it (its stop script ends even a stopped process), which
    also frees the only host's one agent place for the replacement."""
    import signal

    section = _ssh_section(sshd, agent_dir, [(sshd.addresses[0], sshd.port)])
    async with cluster_ctx(
        nursery,
        tmp_path,
        heartbeat_timeout=2.0,
        link_grace=0.5,
        unknown_tvm_timeout=1.0,
        provisioners=parse_provisioners(section),
    ) as c:
        await c.client.pools.add(
            "p", target_dedicated=1, metadata=[m.MetadataItem(name="provisioner", value="lab")]
        )
        await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="1 idle TVM over ssh")
        (first,) = [t.agent_id for t in await c.client.tvms.list("p")]
        group = _pool_group(agent_dir, first)
        pids = agent_pids(os.path.join(agent_dir, first))
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            await c.wait_for(
                lambda: not agent_pids(os.path.join(agent_dir, first)),
                timeout=90,
                what="the stopped agent's processes gone",
            )
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        await c.wait_for(
            lambda: _replaced(c, first), timeout=90, what="a new agent's TVM in the pool"
        )
        assert not os.path.exists(os.path.join(agent_dir, first))  # wiped as on shrink
        assert first not in c.rc.service.core.agents
        assert c.rc.service.core.retired_reason(first).startswith("AgentRetired: ")
        assert len(agent_pids(agent_dir)) == 1
        assert not _group_exists(group), f"the stopped agent's pool group {group} was left"
