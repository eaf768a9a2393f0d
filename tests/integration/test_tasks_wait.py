"""Waiting for a task's completion in one request (`?waitForCompletion=`) with a real agent."""

from __future__ import annotations

import functools

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


@pytest.mark.parametrize("direct", ["1", "0"])
async def test_a_wait_whose_client_hung_up_ends_at_once(nursery, tmp_path, monkeypatch, direct):
    """A waiting GET holds one of the coordinator's requests in progress (at most 1,024): a client
    that gives up must give it back then, not when the wait would have ended (up to 60 s later).
    Both the direct REST path and hypercorn's (TVM_HTTP_DIRECT=0)."""
    from coordinator.client import AsyncClient

    monkeypatch.setenv("TVM_HTTP_DIRECT", direct)
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.pools.add("p", target_dedicated=0)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "true")  # no TVM: it stays active
        svc, app = c.rc.service, c.rc.app
        impatient = [AsyncClient(c.rc.endpoint, c.rc.account, c.rc.key) for _ in range(3)]
        try:
            async with trio.open_nursery() as n:
                for client in impatient:
                    n.start_soon(
                        functools.partial(client.tasks.get, "wi", JOB, "t", wait_for_completion=60)
                    )
                await c.wait_for(lambda: len(svc.done_waiters._waiting.get(f"wi/{JOB}/t", [])) == 3,
                                 what="three waiting GETs")  # fmt: skip
                assert app.inflight == 3
                n.cancel_scope.cancel()  # the clients give up...
            for client in impatient:
                await client.aclose()  # ...and close their connections
            await c.wait_for(
                lambda: not svc.done_waiters and not app.inflight,
                timeout=5,
                what="the abandoned waits ended",
            )
        finally:
            for client in impatient:
                await client.aclose()
        # The service still answers, waits included.
        t = await c.client.tasks.get("wi", JOB, "t", wait_for_completion=0.2)
        assert t.state == "active"
