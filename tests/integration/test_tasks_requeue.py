"""Issue 4 item 6 with real agents: a running task goes back to the queue when its TVM is lost and
finishes on the other agent; a late result from the lost agent is not recorded a second time."""

from __future__ import annotations

import os
import signal

from tests.harness import cluster_ctx

JOB = "job-0000000001"
# Exits with the code written in the TVM's shared/code (0 when there is none).
CMD = "sh -c 'sleep 1.5; exit $(cat $AZ_BATCH_NODE_SHARED_DIR/code 2>/dev/null || echo 0)'"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


async def _task(c, name="t"):
    return await c.client.tasks.get("wi", JOB, name)


async def _running_on(c, name="t"):
    t = await _task(c, name)
    return t.tvm_info.tvm_name if t.state == "running" and t.tvm_info else None


async def _tvm_state(c, tvm, state):
    return (await c.client.tvms.get("p", tvm)).state == state


async def _total_run(c):
    return sum(t.total_tasks_run for t in await c.client.tvms.list("p"))


async def _setup(c):
    await c.pool_with_tvms("p", 2)
    await c.client.workitems.add("wi", "p")
    await c.client.tasks.add("wi", JOB, "t", CMD, max_task_retry_count=0)
    tvm = await c.wait_for(lambda: _running_on(c), what="t running")
    holder = (await c.client.tvms.get("p", tvm)).agent_id
    agent = next(a for a in c.agents if a.name == holder)
    return tvm, agent


async def test_sigkilled_agent_task_finishes_on_the_other(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=1.5) as c:
        tvm, agent = await _setup(c)
        _write(
            os.path.join(agent.root, "shared", "code"), "7\n"
        )  # a recorded lost run would fail with 7
        agent.kill(signal.SIGKILL)
        await c.wait_for(lambda: _tvm_state(c, tvm, "unknown"), what="lost TVM unknown")
        t = await c.wait_for(lambda: _done(c), timeout=30, what="t completed elsewhere")
        info = t.execution_info
        assert t.tvm_info.tvm_name != tvm
        assert (info.exit_code, info.requeue_count, info.retry_count) == (0, 1, 0)
        assert info.last_requeue_time
        assert info.scheduling_error is None
        # The old agent comes back (same id, same root): its TVM is usable again, and the task stays
        # completed once.
        c.start_agent(agent.name, root=agent.root)
        await c.wait_for(lambda: _tvm_state(c, tvm, "idle"), what="old TVM idle again")
        await _barrier(c, tvm)
        t = await _task(c)
        assert (t.state, t.execution_info.exit_code, t.execution_info.requeue_count) == (
            "completed",
            0,
            1,
        )
        assert t.tvm_info.tvm_name != tvm
        assert await _total_run(c) == 3  # t once, b1, b2


async def test_silent_agent_result_after_requeue_recorded_once(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=1.0) as c:
        tvm, agent = await _setup(c)
        _write(os.path.join(agent.root, "shared", "code"), "7\n")
        # Freeze the agent (its task keeps running and will exit 7): its link goes silent.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            await c.wait_for(lambda: _tvm_state(c, tvm, "unknown"), what="silent TVM unknown")
            t = await _task(c)
            assert t.execution_info.requeue_count == 1
            assert t.state in ("active", "running")
            await c.wait_for(lambda: _done(c), timeout=30, what="t completed on the other agent")
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        # The old agent wakes up, reports the old run's result (exit 7) and reconnects.
        await c.wait_for(lambda: _tvm_state(c, tvm, "idle"), timeout=30, what="old TVM back")
        await _barrier(c, tvm)
        t = await _task(c)
        info = t.execution_info
        assert (t.state, info.exit_code, info.requeue_count, info.retry_count) == (
            "completed",
            0,
            1,
            0,
        )
        assert t.tvm_info.tvm_name != tvm
        assert await _total_run(c) == 3  # t once, b1, b2


async def _barrier(c, tvm):
    """Run a task on each TVM: once the old TVM completed one, everything its agent sent before
    (the lost run's result included: one link, in order) has been handled by the coordinator."""
    await c.client.tasks.add("wi", JOB, "b1", "sleep 0.5")
    await c.client.tasks.add("wi", JOB, "b2", "sleep 0.5")
    await c.client.tasks.wait("wi", JOB, timeout=30)
    ran = {(await _task(c, n)).tvm_info.tvm_name for n in ("b1", "b2")}
    assert tvm in ran


async def _done(c):
    t = await _task(c)
    return t if t.state == "completed" else None


async def test_requeued_task_placed_again_on_the_same_tvm_runs(nursery, tmp_path):
    """One agent: it freezes, its TVM is lost, the task is requeued; when the agent wakes the task
    is placed on the same TVM while the old run is still being cancelled there: the new run must
    start once the old one is gone, not be dropped."""
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=1.0) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "sh -c 'sleep 3; exit 7'", max_task_retry_count=0)
        tvm = await c.wait_for(lambda: _running_on(c), what="t running")
        agent = c.agents[0]
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            await c.wait_for(lambda: _tvm_state(c, tvm, "unknown"), what="silent TVM unknown")
            assert (await _task(c)).execution_info.requeue_count == 1
            await c.client.tasks.update(
                "wi", JOB, "t", max_wall_clock_time="PT1S"
            )  # the new run ends fast
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        t = await c.wait_for(lambda: _done(c), timeout=30, what="t completed after requeue")
        info = t.execution_info
        assert (t.tvm_info.tvm_name, info.requeue_count, info.retry_count) == (tvm, 1, 0)
        assert info.exit_code == 3221225786  # the new run (wall clock), not the old one's 7
