"""Issue 5 with real agents: growing a pool through the local provisioner, shrinking it with each
deallocation option, removing and deleting TVMs, resize timeouts, and bad input over REST."""

from __future__ import annotations

import os
import shlex

import pytest

from coordinator.client import BatchError, task_spec
from tests.harness import cluster_ctx

JOB = "job-0000000001"


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


def gated(gate: os.PathLike) -> str:
    return sh(f"while [ ! -e {gate} ]; do sleep 0.05; done")


async def _tvms(c, pool: str, *states: str) -> list:  # noqa: ANN001
    return [t for t in await c.client.tvms.list(pool) if not states or t.state in states]


async def _steady(c, pool: str, current: int) -> bool:  # noqa: ANN001
    p = await c.client.pools.get(pool)
    return (
        p.allocation_state == "steady"
        and p.current_dedicated == current
        and len(await _tvms(c, pool)) == current
    )


async def _running(c, n: int) -> bool:  # noqa: ANN001
    return sum(1 for t in await c.client.tasks.list("wi", JOB) if t.state == "running") == n


async def test_resize_up_with_local_provisioner_then_down_with_taskcompletion(
    nursery, tmp_path, monkeypatch
):
    gate = tmp_path / "gate"
    # Like the harness's agents: the gated tasks run this interpreter, which task users cannot reach.
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")
    async with cluster_ctx(
        nursery,
        tmp_path,
        agents=2,
        heartbeat_timeout=2.0,
        provisioner="local",
        tvm_root_dir=str(tmp_path / "tvms"),
    ) as c:
        # Let the two harness agents register first, so only the resize needs the provisioner.
        core = c.rc.service.core
        await c.wait_for(
            lambda: sum(a.connected for a in core.agents.values()) == 2, what="2 agents"
        )
        await c.pool_with_tvms("p", 2)
        assert not _exists(os.path.join(tmp_path, "state", "agents"))
        await c.client.pools.resize("p", 4)
        assert (await c.client.pools.get("p")).allocation_state == "resizing"
        # Two new agent processes come up under the state dir and join the pool.
        await c.wait_for(lambda: c._idle("p", 4), timeout=60, what="4 idle TVMs")
        provisioned = os.listdir(os.path.join(tmp_path, "state", "agents"))
        assert {"agent-0", "agent-1"} <= set(provisioned)
        assert {t.agent_id for t in await _tvms(c, "p")} >= {"local-0", "local-1"}
        await c.wait_for(lambda: _steady(c, "p", 4), what="steady at 4")
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", gated(gate)) for i in range(4)]
        )
        await c.wait_for(lambda: _running(c, 4), what="4 tasks running")
        tasks = await c.client.tasks.list("wi", JOB)
        assert len({t.tvm_info.tvm_name for t in tasks}) == 4  # one per TVM, the new ones included
        # Shrink with taskcompletion: two TVMs leave only after their tasks finished.
        await c.client.pools.resize("p", 2, tvm_deallocation_option="taskcompletion")
        leaving = await c.wait_for(lambda: _tvms(c, "p", "leavingpool"), what="leaving TVMs")
        assert len(leaving) == 2
        assert all(t.running_tasks_count == 1 for t in leaving)
        assert (await c.client.pools.get("p")).allocation_state == "resizing"
        assert await _running(c, 4)  # nothing was killed
        gate.write_text("")
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 4
        assert all(
            t.execution_info.requeue_count == 0 for t in await c.client.tasks.list("wi", JOB)
        )
        await c.wait_for(lambda: _steady(c, "p", 2), what="steady at 2")


async def test_resize_down_with_requeue_moves_tasks(nursery, tmp_path):
    gate = tmp_path / "gate"
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 2)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", gated(gate)) for i in range(2)]
        )
        await c.wait_for(lambda: _running(c, 2), what="2 tasks running")
        await c.client.pools.resize("p", 1)  # requeue is the default
        await c.wait_for(lambda: _steady(c, "p", 1), what="steady at 1")
        (kept,) = await _tvms(c, "p")
        tasks = await c.client.tasks.list("wi", JOB)
        moved = [t for t in tasks if t.execution_info.requeue_count == 1]
        assert len(moved) == 1
        gate.write_text("")
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 2
        assert {t.tvm_info.tvm_name for t in await c.client.tasks.list("wi", JOB)} == {kept.name}
        # The agent that left is clean and back in the free inventory: a new pool gets it.
        await c.pool_with_tvms("q", 1)
        (fresh,) = await _tvms(c, "q")
        assert fresh.name != kept.name


async def test_remove_and_delete_tvms(nursery, tmp_path):
    gate = tmp_path / "gate"
    async with cluster_ctx(nursery, tmp_path, agents=3, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 2)
        await c.pool_with_tvms("q", 1)
        p_names = [t.name for t in await _tvms(c, "p")]
        (q_tvm,) = await _tvms(c, "q")
        with pytest.raises(BatchError) as info:
            await c.client.pools.remove_tvms("p", [p_names[0], q_tvm.name])
        assert (info.value.status, info.value.code) == (400, "TVMNotInPool")
        assert len(await _tvms(c, "p")) == 2  # nothing changed
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", gated(gate))
        await c.wait_for(lambda: _running(c, 1), what="task running")
        where = (await c.client.tasks.get("wi", JOB, "t")).tvm_info.tvm_name
        agent_of = {t.name: t.agent_id for t in await _tvms(c, "p")}
        await c.client.tvms.delete("p", where)  # requeues what ran there
        await c.wait_for(lambda: _steady(c, "p", 1), what="steady at 1")
        assert (await c.client.pools.get("p")).target_dedicated == 1
        task = await c.wait_for(lambda: _task_on_other(c, where), what="task moved")
        assert task.execution_info.requeue_count == 1
        # The removed TVM's agent wiped everything it had.
        gone_root = next(a.root for a in c.agents if a.name == agent_of[where])
        assert not _exists(os.path.join(gone_root, "tasks"))
        with pytest.raises(BatchError) as info:
            await c.client.tvms.get("p", where)
        assert info.value.code == "TVMNotFound"
        (other,) = await _tvms(c, "p")
        await c.client.pools.remove_tvms("p", [other.name], tvm_deallocation_option="terminate")
        await c.wait_for(lambda: _steady(c, "p", 0), what="steady at 0")
        task = await c.client.tasks.get("wi", JOB, "t")
        assert task.state == "completed"
        assert task.execution_info.scheduling_error.code == "TaskEnded"


async def _task_on_other(c, old: str):  # noqa: ANN001, ANN202
    t = await c.client.tasks.get("wi", JOB, "t")
    return t if t.state == "running" and t.tvm_info and t.tvm_info.tvm_name != old else None


async def test_resize_timeout_and_stop_resize(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3.0) as c:
        core = c.rc.service.core
        await c.wait_for(lambda: any(a.connected for a in core.agents.values()), what="the agent")
        await c.client.pools.add("p", target_dedicated=3, resize_timeout="PT1S")

        async def timed_out():  # noqa: ANN202
            p = await c.client.pools.get("p")
            return p if p.allocation_state == "steady" and p.resize_error else None

        pool = await c.wait_for(timed_out, what="resize timeout")
        assert pool.resize_error.code == "AllocationTimedout"
        assert pool.current_dedicated == 1
        assert pool.target_dedicated == 3
        await c.client.pools.resize("p", 4, resize_timeout="PT1H")
        assert (await c.client.pools.get("p")).allocation_state == "resizing"
        await c.client.pools.stop_resize("p")
        pool = await c.client.pools.get("p")
        assert (pool.allocation_state, pool.target_dedicated) == ("steady", 1)
        assert pool.resize_error.code == "ResizeStopped"


async def test_pool_bad_input_over_rest(nursery, tmp_path):
    async with cluster_ctx(
        nursery, tmp_path, agents=0, heartbeat_timeout=2.0, max_pool_size=10
    ) as c:
        cases = [
            (lambda: c.client.pools.add("a", vm_size="galactic"), 400, "InvalidVmSize"),
            (
                lambda: c.client.pools.add("a", vm_size="small", max_tasks_per_vm=5),
                400,
                "InvalidPropertyValue",
            ),
            (lambda: c.client.pools.add("a", target_dedicated=11), 400, "InvalidPropertyValue"),
        ]
        for call, status, code in cases:
            with pytest.raises(BatchError) as info:
                await call()
            assert (info.value.status, info.value.code) == (status, code)
        assert await c.client.pools.list() == []
        await c.client.pools.add("p")
        await c.client.pools.add(
            "auto", enable_auto_scale=True, auto_scale_formula="$TargetDedicated = 0;"
        )
        cases = [
            (lambda: c.client.pools.resize("p", -1), 400, "InvalidPropertyValue"),
            (lambda: c.client.pools.resize("p", 11), 400, "InvalidPropertyValue"),
            (
                lambda: c.client.pools.resize("p", 1, tvm_deallocation_option="whenever"),
                400,
                "InvalidPropertyValue",
            ),
            (lambda: c.client.pools.resize("auto", 1), 409, "AutoScaleEnabled"),
            (lambda: c.client.pools.stop_resize("p"), 409, "PoolNotResizing"),
            (lambda: c.client.pools.remove_tvms("p", ["tvm-nope"]), 404, "TVMNotFound"),
            (lambda: c.client.tvms.reboot("p", "tvm-nope"), 404, "TVMNotFound"),
            (lambda: c.client.tvms.reboot("nopool", "tvm-nope"), 404, "PoolNotFound"),
        ]
        for call, status, code in cases:
            with pytest.raises(BatchError) as info:
                await call()
            assert (info.value.status, info.value.code) == (status, code), info.value
        assert (await c.client.pools.get("p")).target_dedicated == 0
        sizes = {s.name: s for s in await c.client.pools.vm_sizes()}
        assert sizes["large"].cores == 4
        assert sizes["large"].max_tasks_per_vm == 16


def _exists(path: str) -> bool:
    return os.path.exists(path)
