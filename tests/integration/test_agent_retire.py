"""A provisioned agent whose TVM was lost and replaced does not linger: real coordinator, real agent
processes. SIGSTOPped past the heartbeat timeout until its TVM left the pool, the local
provisioner's agent is killed (by PID, though stopped) and after SIGCONT nothing of it is left,
the pool holding exactly its target. An agent that does come back after its retirement (its
provisioner could not stop it) is refused with `AgentRetired` and exits, saying why in its log;
a hand-started one is free again, as before."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from typing import Any

import trio

from benchmarks._procs import remove_agent_cgroups
from tests.harness import Cluster, cluster_ctx

JOB = "job-0000000001"
HEARTBEAT = 2.0


def gated(gate: Any) -> str:
    return "/bin/sh -c " + shlex.quote(f"while [ ! -e {gate} ]; do sleep 0.05; done")


async def _tvm_of(c: Cluster, agent: str) -> Any:
    for t in await c.client.tvms.list("p"):
        if t.agent_id == agent:
            return t
    return None


async def _busy_agent(c: Cluster, gate: Any) -> Any:
    """A TVM of pool p running a gated task."""
    await c.client.workitems.add("wi", "p")
    await c.client.tasks.add("wi", JOB, "t", gated(gate))

    async def running() -> Any:
        t = await c.client.tasks.get("wi", JOB, "t")
        return t if t.state == "running" and t.tvm_info is not None else None

    task = await c.wait_for(running, timeout=60, what="the task running")
    for t in await c.client.tvms.list("p"):
        if t.name == task.tvm_info.tvm_name:
            return t
    raise AssertionError("no TVM for the running task")


async def _replaced(c: Cluster, old: Any, target: int) -> bool:
    tvms = await c.client.tvms.list("p")
    ok = [t for t in tvms if t.state in ("idle", "running")]
    return len(ok) == target and all(t.name != old.name for t in tvms)


async def test_a_stopped_provisioned_agent_is_killed_once_its_tvm_is_replaced(
    nursery: trio.Nursery, tmp_path: Any, monkeypatch: Any
) -> None:
    gate = tmp_path / "gate"
    tvm_root = tmp_path / "tvms"
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")  # the gate runs as the agent's user
    target = 2
    async with cluster_ctx(
        nursery,
        tmp_path,
        heartbeat_timeout=HEARTBEAT,
        link_grace=1.0,
        provisioner="local",
        tvm_root_dir=str(tvm_root),
    ) as c:
        prov = c.rc.service.provisioner
        try:
            await c.client.pools.add("p", target_dedicated=target, unknown_tvm_timeout="PT2S")
            await c.wait_for(lambda: c._idle("p", target), timeout=90, what="2 provisioned TVMs")
            victim = await _busy_agent(c, gate)
            proc = prov.procs[int(str(victim.agent_id).rpartition("-")[2])]
            os.killpg(proc.pid, signal.SIGSTOP)
            try:
                await c.wait_for(
                    lambda: _replaced(c, victim, target), timeout=90, what="the TVM replaced"
                )
                # Killed while stopped, by the coordinator (the watcher reaps it).
                await c.wait_for(lambda: proc.poll() is not None, what="the stopped agent gone")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
            assert proc.returncode == -signal.SIGKILL
            core = c.rc.service.core
            assert victim.agent_id not in core.agents
            assert core.retired_reason(victim.agent_id).startswith(
                f"AgentRetired: its TVM {victim.name} was lost (HeartbeatTimeout)"
            )
            # Exactly the target: the other agent and the replacement, no free extra agent.
            tvms = await c.client.tvms.list("p")
            assert len(tvms) == target
            assert sorted(core.agents) == sorted(t.agent_id for t in tvms)
            assert sum(p.poll() is None for p in prov.procs) == target
            gate.write_text("")
            counts = await c.client.tasks.wait("wi", JOB, timeout=60)
            assert counts.succeeded == 1
            task = await c.client.tasks.get("wi", JOB, "t")
            assert task.execution_info.requeue_count == 1
            assert task.tvm_info.tvm_name != victim.name
        finally:
            gate.write_text("")
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(prov.stop_all)
                for i in range(len(prov.procs)):
                    remove_agent_cgroups(f"local-{i}", str(tvm_root / f"agent-{i}"))


async def test_a_retired_agent_that_comes_back_is_refused_and_exits(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    """A provisioner that cannot stop its agent at once (an ssh host out of reach): here no
    provisioner at all, told that agent0 was one of its own, so nothing kills it."""
    async with cluster_ctx(
        nursery, tmp_path, agents=2, heartbeat_timeout=HEARTBEAT, link_grace=1.0
    ) as c:
        c.rc.service.core.agents_started(["agent0"])
        await c.pool_with_tvms("p", 2, unknown_tvm_timeout="PT2S")
        victim = await _tvm_of(c, "agent0")
        other = await _tvm_of(c, "agent1")
        c.agents[0].signal(signal.SIGSTOP)
        try:

            async def gone() -> bool:
                return await _tvm_of(c, "agent0") is None

            await c.wait_for(gone, timeout=60, what="agent0's TVM gone from the pool")
        finally:
            c.agents[0].signal(signal.SIGCONT)
        rc = await trio.to_thread.run_sync(lambda: c.agents[0].proc.wait(60))
        assert rc == 2  # gave up: refused for good
        log = c.agents[0].log_text()
        assert "AgentRetired: its TVM " in log
        assert f"{victim.name} was lost (HeartbeatTimeout) and left pool p" in log
        assert "agent0" not in c.rc.service.core.agents
        assert c.rc.service.agent_link_events.get("AgentRetired", 0) >= 1
        assert [t.name for t in await c.client.tvms.list("p")] == [other.name]


async def test_a_hand_started_agent_comes_back_as_a_free_agent(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    async with cluster_ctx(
        nursery, tmp_path, agents=2, heartbeat_timeout=HEARTBEAT, link_grace=1.0
    ) as c:
        await c.pool_with_tvms("p", 2, unknown_tvm_timeout="PT2S")
        victim = await _tvm_of(c, "agent0")
        c.agents[0].signal(signal.SIGSTOP)
        try:

            async def gone() -> bool:
                return all(t.name != victim.name for t in await c.client.tvms.list("p"))

            await c.wait_for(gone, timeout=60, what="agent0's TVM gone from the pool")
        finally:
            c.agents[0].signal(signal.SIGCONT)
        # No provisioner: the pool takes agent0 back as a new TVM once it reconnects.
        await c.wait_for(lambda: c._idle("p", 2), timeout=60, what="agent0 back in the pool")
        again = await _tvm_of(c, "agent0")
        assert again is not None
        assert again.name != victim.name
        assert c.agents[0].proc.poll() is None
        assert c.rc.service.core.retired_reason("agent0") == ""


def test_the_local_provisioner_kills_a_stopped_agent_and_ignores_names_not_its_own(
    tmp_path: Any,
) -> None:
    from coordinator.runtime.provisioner import LocalProvisioner

    # Nobody listens there: the agent keeps trying to connect, which is all this needs.
    prov = LocalProvisioner(
        str(tmp_path / "state"), "ws://127.0.0.1:9/agent", "t", tvm_root_dir=str(tmp_path / "tvms")
    )
    try:
        (name,) = prov.start(1)
        (proc,) = prov.procs
        os.killpg(proc.pid, signal.SIGSTOP)
        for other in ("agent0", "local-7", "local-x", ""):
            prov.retire(other, "not one of ours")  # nothing to stop, and no error
        assert proc.poll() is None
        prov.retire(name, "AgentRetired: test")
        assert proc.wait(30) == -signal.SIGKILL
        assert prov.exited() == [(name, f"its process {proc.pid} was killed by signal 9")]
        prov.retire(name, "again")  # already gone: nothing happens
    finally:
        for p in prov.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
        prov.stop_all()
        remove_agent_cgroups("local-0", str(tmp_path / "tvms" / "agent-0"))
