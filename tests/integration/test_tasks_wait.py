"""Waiting for a task's completion in one request (`?waitForCompletion=`) with a real agent."""

from __future__ import annotations

import pytest
import trio

from coordinator.client import BatchError
from coordinator.client._http import _Call
from tests.harness import cluster_ctx

JOB = "job-0000000001"


async def test_a_get_waits_for_completion_or_its_time(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "short", "sleep 0.5")
        await c.client.tasks.add("wi", JOB, "long", "sleep 30")

        # Answered when the task completed: it could not have completed yet when asked.
        t = await c.client.tasks.get("wi", JOB, "short", wait_for_completion=20)
        assert t.state == "completed"
        assert t.execution_info.exit_code == 0

        # Answered when the time is up, with the task as it is then.
        t = await c.client.tasks.get("wi", JOB, "long", wait_for_completion=0.3)
        assert t.state in ("active", "running")

        # A waiter is woken by a termination too, not only by an agent's result.
        async with trio.open_nursery() as n:
            got = []

            async def waiter() -> None:
                got.append(await c.client.tasks.get("wi", JOB, "long", wait_for_completion=20))

            n.start_soon(waiter)
            await trio.sleep(0.2)
            await c.client.tasks.terminate("wi", JOB, "long")
        assert got[0].state == "completed"

        # A completed task answers at once.
        t = await c.client.tasks.get("wi", JOB, "short", wait_for_completion=20)
        assert t.state == "completed"


async def test_bad_waits_are_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.pools.add("p", target_dedicated=0)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "true")
        for bad in ("PT61S", "soon", "-PT1S"):
            with pytest.raises(BatchError) as e:
                await c.client._call(
                    _Call(
                        "GET",
                        f"/workitems/wi/jobs/{JOB}/tasks/t",
                        params={"waitForCompletion": bad},
                    )
                )
            assert e.value.status == 400
            assert "waitForCompletion" in e.value.message
