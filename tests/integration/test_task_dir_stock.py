"""The agent's stock of ready task directories grows to the last burst's size while the agent is
idle, and not while a task runs (its CPU is not taken from tasks)."""

from __future__ import annotations

import os

import trio

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tvmagent.taskdirs import stock_on_disk

JOB = "job-0000000001"
BURST = 60


async def test_the_stock_grows_after_a_burst_once_the_agent_is_idle(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        agent = c.start_agent()
        root = os.path.join(str(tmp_path), "agents", agent.name)
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
        await c.client.workitems.add("wi", "p")
        specs = [task_spec(f"t{i}", "true") for i in range(BURST)]
        await c.client.tasks.add_many("wi", JOB, specs)
        await c.client.tasks.wait("wi", JOB, timeout=120)
        await c.client.tasks.add("wi", JOB, "busy", "sleep 3")
        await c.wait_for(
            lambda: _state(c, "busy", "running"), what="the busy task running", timeout=30
        )
        await trio.sleep(1.5)  # longer than the agent's quiet period: it would grow if idle
        assert stock_on_disk(root) <= 32, "the stock grew while a task ran"
        await c.client.tasks.wait("wi", JOB, timeout=30)
        await c.wait_for(
            lambda: stock_on_disk(root) >= BURST, what=f"{BURST} ready directories", timeout=20
        )
        # The directories made ahead serve the next burst like it: its tasks all run.
        before = stock_on_disk(root)
        await c.client.tasks.add_many("wi", JOB, [task_spec(f"u{i}", "true") for i in range(BURST)])
        await c.client.tasks.wait("wi", JOB, timeout=120)
        tasks = await c.client.tasks.list("wi", JOB)
        assert all(t.execution_info.exit_code == 0 for t in tasks)
        assert before >= BURST


async def _state(c, name: str, state: str) -> bool:
    return (await c.client.tasks.get("wi", JOB, name)).state == state
