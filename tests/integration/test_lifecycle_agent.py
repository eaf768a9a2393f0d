"""Issue 9 §3 with real agent processes: SIGTERM drains (Draining -> TVM offline, no new tasks, running
ones finish within the grace period or are killed and requeued) and exits 0; an agent that restarts
has its lost tasks requeued and its TVM joined again, without waiting for the heartbeat timeout."""

from __future__ import annotations

import os
import shlex
import signal

import trio

from tests.harness import AgentProc, Cluster, cluster_ctx

JOB = "job-0000000001"


def _config(tmp_path, grace: float) -> str:
    path = tmp_path / f"agent-grace-{grace}.toml"
    path.write_text(f"drain-grace = {grace}\n")
    return str(path)


async def _exit_code(agent: AgentProc, limit: float = 30.0) -> int:
    return await trio.to_thread.run_sync(lambda: agent.proc.wait(timeout=limit))


async def _task(c: Cluster, name: str):  # noqa: ANN202
    return await c.client.tasks.get("wi", JOB, name)


async def _tvm_state(c: Cluster, pool: str) -> str:
    (tvm,) = await c.client.tvms.list(pool)
    return tvm.state


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_sigterm_drains_running_task_takes_no_new_ones_and_exits_0(nursery, tmp_path):
    gate, started = tmp_path / "gate", tmp_path / "started"
    cmd = f"sh -c {shlex.quote(f'touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done; echo finished')}"
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=30) as c:
        agent = c.start_agent("drainer", extra_args=["--config", _config(tmp_path, 60)])
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t1", cmd)
        await c.wait_for(lambda: started.exists(), what="t1 running")
        agent.kill(signal.SIGTERM)
        await c.wait_for(lambda: _is(c, "offline"), what="TVM offline after Draining")
        # A task added now is not placed on the draining TVM.
        await c.client.tasks.add("wi", JOB, "t2", "true")
        assert (await _task(c, "t2")).state == "active"
        assert agent.proc.poll() is None  # still waiting for t1 (grace 60 s)
        gate.touch()
        assert await _exit_code(agent) == 0
        t1 = await _task(c, "t1")
        assert t1.state == "completed"
        assert t1.execution_info.exit_code == 0
        assert t1.execution_info.requeue_count == 0
        assert (await _task(c, "t2")).state == "active"
        assert "drained; exiting" in agent.log_text()


async def _is(c: Cluster, state: str) -> bool:
    return await _tvm_state(c, "p") == state


async def test_drain_grace_over_kills_the_task_tree_requeues_it_and_a_restart_runs_it_again(
    nursery, tmp_path
):
    runs, pidfile = tmp_path / "runs", tmp_path / "pid"
    script = (
        f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] && exit 0; "
        f"sleep 300 & echo $! > {pidfile}; wait"
    )
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=30) as c:
        cfg = _config(tmp_path, 0.3)
        agent = c.start_agent("impatient", extra_args=["--config", cfg])
        await c.pool_with_tvms("p", 1)
        (tvm_before,) = [t.name for t in await c.client.tvms.list("p")]
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", f"sh -c {shlex.quote(script)}")
        await c.wait_for(
            lambda: pidfile.exists() and pidfile.read_text().strip(), what="task's child started"
        )
        child = int(pidfile.read_text())
        agent.kill(signal.SIGTERM)
        assert await _exit_code(agent) == 0
        # The whole tree was killed, not just the shell.
        await c.wait_for(lambda: not _alive(child), timeout=10, what="task's child process gone")
        # Handed back: requeued, no retry used, not failed.
        t = await c.wait_for(lambda: _requeued(c), what="task requeued")
        assert (t.execution_info.retry_count, t.execution_info.exit_code) == (0, None)
        assert "killing 1 task(s), they will be requeued" in agent.log_text()
        # The same agent comes back: same TVM, joined again, the task runs (second run exits 0).
        again = c.start_agent("impatient", root=agent.root, extra_args=["--config", cfg])
        done = await c.wait_for(lambda: _completed(c, "t"), what="task completed after the restart")
        assert done.execution_info.exit_code == 0
        assert done.execution_info.requeue_count == 1
        assert done.tvm_info.tvm_name == tvm_before
        assert runs.read_text() == "run\nrun\n"
        assert again.proc.poll() is None


async def _requeued(c: Cluster):  # noqa: ANN202
    t = await _task(c, "t")
    return (
        t
        if t.state == "active" and t.execution_info and t.execution_info.requeue_count == 1
        else None
    )


async def _completed(c: Cluster, name: str):  # noqa: ANN202
    t = await _task(c, name)
    return t if t.state == "completed" else None


async def test_agent_crash_and_restart_requeues_the_lost_task_at_once(nursery, tmp_path, caplog):
    runs, pidfile = tmp_path / "runs", tmp_path / "pid"
    script = (
        f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] && exit 0; "
        f"sleep 300 & echo $! > {pidfile}; wait"
    )
    child = None
    # A long heartbeat timeout: the requeue below can only come from the restart reconciliation.
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=60) as c:
        try:
            agent = c.start_agent("crashy")
            await c.pool_with_tvms("p", 1)
            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add("wi", JOB, "t", f"sh -c {shlex.quote(script)}")
            await c.wait_for(
                lambda: pidfile.exists() and pidfile.read_text().strip(), what="task running"
            )
            child = int(pidfile.read_text())
            agent.kill(signal.SIGKILL)
            await _exit_code(agent)
            assert (await _task(c, "t")).state == "running"  # the coordinator cannot know yet
            c.start_agent("crashy", root=agent.root)
            done = await c.wait_for(
                lambda: _completed(c, "t"), timeout=30, what="requeued task completed"
            )
            assert done.execution_info.exit_code == 0
            assert done.execution_info.requeue_count == 1
            assert done.execution_info.retry_count == 0
            assert runs.read_text() == "run\nrun\n"
            assert await _tvm_state(c, "p") == "idle"
            # The coordinator says why the task ran again, naming the agent, TVM and task.
            (rec,) = [r for r in caplog.records if "came back without" in r.getMessage()]
            assert "crashy" in rec.getMessage()
            assert rec.tvm == done.tvm_info.tvm_name
            assert rec.tasks == [f"wi/{JOB}/t"]
        finally:
            # Without cgroups a SIGKILLed agent cannot take its task tree along.
            if child is not None and _alive(child):
                os.kill(child, signal.SIGKILL)
