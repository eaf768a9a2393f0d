"""TVM healing with a real coordinator and real agent processes: an agent killed by SIGKILL loses its
TVM (`unknown`, its task requeued) long before the heartbeat timeout — at once when the local
provisioner sees its process exit, after the short link grace otherwise — and an `unknown` TVM
leaves its pool after the pool's unknownTvmTimeout, the provisioner starting a new agent in its
place. The reason shows on the TVM's REST record and in `tvm status`."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from typing import Any

import trio

from tests.harness import Cluster, agent_env, cluster_ctx, remove_agent_cgroups

JOB = "job-0000000001"
# Far longer than any wait below: what happens here is not the heartbeat timeout's doing.
HEARTBEAT_TIMEOUT = 120.0


def gated(gate: Any) -> str:
    return "/bin/sh -c " + shlex.quote(f"while [ ! -e {gate} ]; do sleep 0.05; done")


async def _tvm_of(c: Cluster, pool: str, agent: str) -> Any:
    for t in await c.client.tvms.list(pool):
        if t.agent_id == agent:
            return t
    return None


async def _task(c: Cluster, name: str) -> Any:
    return await c.client.tasks.get("wi", JOB, name)


async def _status(c: Cluster) -> tuple[str, dict[str, Any]]:
    env = agent_env(
        {
            "TVM_ENDPOINT": c.rc.endpoint,
            "TVM_ACCOUNT": c.rc.account,
            "TVM_KEY": c.rc.key,
            "COLUMNS": "250",
        }
    )
    cmd = [sys.executable, "-m", "coordinator.cli", "status"]
    text = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    )
    assert text.returncode == 0, text.stderr
    js = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [*cmd, "-o", "json"], capture_output=True, text=True, env=env, timeout=60
        )
    )
    return text.stdout, json.loads(js.stdout)


async def test_a_killed_local_agent_is_lost_at_once_and_replaced(
    nursery: trio.Nursery, tmp_path: Any, monkeypatch: Any
) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")  # the gate runs as the agent's user
    async with cluster_ctx(
        nursery,
        tmp_path,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        provisioner="local",
        tvm_root_dir=str(tmp_path / "tvms"),
    ) as c:
        await c.client.pools.add("p", target_dedicated=1, unknown_tvm_timeout="PT3S")
        await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="the provisioned TVM idle")
        first = await _tvm_of(c, "p", "local-0")
        assert first is not None
        assert (await c.client.pools.get("p")).unknown_tvm_timeout == "PT3S"
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", gated(gate))
        await c.wait_for(
            lambda: _running_on(c, "t", first.name), what="the task running on local-0"
        )
        proc = c.rc.service.provisioner.procs[0]
        proc.send_signal(signal.SIGKILL)  # started by this test's coordinator, stopped by its PID

        async def lost() -> Any:
            t = await _tvm_of(c, "p", "local-0")
            return t if t is not None and t.state == "unknown" else None

        tvm = await c.wait_for(lost, timeout=30, what="local-0's TVM unknown")
        assert tvm.state_reason.startswith("AgentExited: its process ")
        assert "signal 9" in tvm.state_reason
        # The pool's timeout passes: the TVM leaves, the provisioner starts local-1 in its place.
        await c.wait_for(
            lambda: _tvm_of(c, "p", "local-1"), timeout=60, what="a replacement TVM from local-1"
        )
        assert await _tvm_of(c, "p", "local-0") is None
        await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="the replacement idle")
        gate.write_text("")
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert counts.succeeded == 1
        task = await _task(c, "t")
        assert task.execution_info.requeue_count == 1
        assert task.execution_info.retry_count == 0
        assert task.tvm_info.tvm_name != first.name
    # what the killed agent kept for a restart on its root, which never comes
    remove_agent_cgroups("local-0", str(tmp_path / "tvms" / "agent-0"))


async def _running_on(c: Cluster, task: str, tvm: str) -> bool:
    t = await _task(c, task)
    return t.state == "running" and t.tvm_info is not None and t.tvm_info.tvm_name == tvm


async def test_a_link_that_does_not_come_back_loses_its_tvm_after_the_grace(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    gate = tmp_path / "gate"
    async with cluster_ctx(
        nursery, tmp_path, agents=2, heartbeat_timeout=HEARTBEAT_TIMEOUT, link_grace=2.0
    ) as c:
        await c.pool_with_tvms("p", 2)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", gated(gate))
        task = await c.wait_for(lambda: _running_task(c, "t"), what="the task running", timeout=30)
        owner = await _tvm_name_agent(c, task.tvm_info.tvm_name)
        victim = next(a for a in c.agents if a.name == owner)
        victim.kill(signal.SIGKILL)  # no provisioner watches it: only the closed link tells

        async def lost() -> Any:
            t = await _tvm_of(c, "p", victim.name)
            return t if t is not None and t.state == "unknown" else None

        tvm = await c.wait_for(lost, timeout=30, what="the killed agent's TVM unknown")
        assert tvm.state_reason.startswith("AgentLinkLost: ")
        text, js = await _status(c)
        assert f"UNKNOWN p/{tvm.name}: AgentLinkLost: " in text
        (health,) = [t for t in js["tvms"] if t["name"] == tvm.name]
        assert health["stateReason"] == tvm.state_reason
        gate.write_text("")
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert counts.succeeded == 1
        done = await _task(c, "t")
        assert done.execution_info.requeue_count == 1
        assert done.tvm_info.tvm_name != tvm.name


async def _running_task(c: Cluster, name: str) -> Any:
    t = await _task(c, name)
    return t if t.state == "running" and t.tvm_info is not None else None


async def _tvm_name_agent(c: Cluster, tvm_name: str) -> str:
    for t in await c.client.tvms.list("p"):
        if t.name == tvm_name:
            return str(t.agent_id)
    raise AssertionError(f"no TVM {tvm_name}")


async def test_a_nearly_full_disk_shows_as_degraded_then_unusable(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 1)
        core = c.rc.service.core
        (tvm,) = await c.client.tvms.list("p")
        # The agent's real disk figures, from its heartbeats; the thresholds are moved around them.
        free, _ = await c.wait_for(
            lambda: core.healing.disk.get(tvm.name), what="a heartbeat with disk figures"
        )
        core.unusable_free_disk_bytes = int(free * 0.6)  # below twice the limit: nearly full

        async def nearly_full() -> Any:
            t = (await c.client.tvms.list("p"))[0]
            modes = [x for x in t.degraded_modes if x.startswith("disk-nearly-full: ")]
            return t if modes else None

        t = await c.wait_for(nearly_full, what="disk-nearly-full in degradedModes")
        assert t.state == "idle"
        _, js = await _status(c)
        assert any(m.startswith("disk-nearly-full: ") for m in js["tvms"][0]["degradedModes"])
        core.unusable_free_disk_bytes = free * 4  # now it is full

        async def full() -> Any:
            t = (await c.client.tvms.list("p"))[0]
            return t if t.state == "unusable" else None

        t = await c.wait_for(full, what="the TVM unusable")
        assert t.state_reason.startswith("DiskFull: ")
        core.unusable_free_disk_bytes = 1024
        await c.wait_for(lambda: c._idle("p", 1), what="the TVM idle again")
        t = (await c.client.tvms.list("p"))[0]
        assert not [x for x in t.degraded_modes if x.startswith("disk-nearly-full")]
