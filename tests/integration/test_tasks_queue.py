"""Short tasks queued on a real agent beyond its slots: they all run, one slot at a time, and the
TVM held more than its slot while they did; a long task ahead of queued ones gets them handed back
unstarted (no retry used) and they run after it; a job terminated while tasks wait in the agent's
queue ends them without running them."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from datetime import datetime

import trio

from coordinator.client import task_spec
from coordinator.core.freeslots import QUEUE_PER_SLOT
from tests.harness import cluster_ctx

JOB = "job-0000000001"
QUEUED = QUEUE_PER_SLOT  # what one slot's queue holds


def _time(iso: str | None) -> datetime:
    assert iso is not None
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


async def _short_job_known(c, n: int = 6) -> None:
    """Run `n` quick tasks to the end so the coordinator knows the job's tasks are short."""
    await c.client.tasks.add_many("wi", JOB, [task_spec(f"warm{i}", "true") for i in range(n)])
    await c.client.tasks.wait("wi", JOB, timeout=60)


@asynccontextmanager
async def _one_slot_short_job(nursery, tmp_path):
    """A coordinator and one agent with one slot, whose job `wi` is known to run short tasks."""
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=1)
        await c.client.workitems.add("wi", "p")
        await _short_job_known(c)
        yield c


async def _queued_behind_a_long_task(c, gate: str, commands: list[str]):
    """Add a task that runs until `gate` exists, then one task per command; wait until those wait in
    the agent's queue behind it. Returns the TVM."""
    long = f"sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done'"
    await c.client.tasks.add_many(
        "wi",
        JOB,
        [task_spec("long", long)] + [task_spec(f"q{i}", cmd) for i, cmd in enumerate(commands)],
    )
    (tvm,) = c.rc.service.core.tvms.values()
    await c.wait_for(
        lambda: len(tvm.running) == 1 + len(commands), what="tasks queued behind the long one"
    )
    return tvm


async def test_short_tasks_wait_in_the_agents_queue_and_all_run(nursery, tmp_path):
    async with _one_slot_short_job(nursery, tmp_path) as c:
        core = c.rc.service.core
        (tvm,) = core.tvms.values()
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(tvm.running))
                await trio.sleep(0.0005)

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            out = os.path.join(str(tmp_path), "order")
            os.makedirs(out, mode=0o777)
            os.chmod(out, 0o777)
            await c.client.tasks.add_many(
                "wi",
                JOB,
                [task_spec(f"t{i:02}", f"touch {out}/t{i:02}") for i in range(40)],
            )
            await c.client.tasks.wait("wi", JOB, timeout=60)
            n.cancel_scope.cancel()
        assert most > 1  # tasks were placed into the agent's queue beyond its one slot
        tasks = {t.name: t for t in await c.client.tasks.list("wi", JOB)}
        ran = [t for n, t in tasks.items() if n.startswith("t")]
        assert len(ran) == 40
        assert all(t.execution_info.exit_code == 0 for t in ran)
        assert all(t.execution_info.retry_count == 0 for t in ran)
        assert sorted(os.listdir(out)) == [f"t{i:02}" for i in range(40)]
        # One slot: no two of them ran at the same time.
        spans = sorted(
            (_time(t.execution_info.start_time), _time(t.execution_info.end_time)) for t in ran
        )
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


async def test_a_long_task_ahead_gets_the_queued_ones_handed_back(nursery, tmp_path):
    async with _one_slot_short_job(nursery, tmp_path) as c:
        gate = os.path.join(str(tmp_path), "gate")
        tvm = await _queued_behind_a_long_task(c, gate, ["true"] * QUEUED)
        core = c.rc.service.core

        async def handed_back():
            s = {t.name: t for t in await c.client.tasks.list("wi", JOB)}
            queued = [s[f"q{i}"] for i in range(QUEUED)]
            return s["long"].state == "running" and all(t.state == "active" for t in queued) and s

        s = await c.wait_for(handed_back, timeout=15, what="the queued tasks handed back")
        assert all(s[f"q{i}"].execution_info.retry_count == 0 for i in range(QUEUED))
        assert len(tvm.running) == 1  # no more queueing for this job: the long one holds the slot
        assert core.queue_handbacks == QUEUED  # counted for /metrics
        with open(gate, "w"):
            pass
        await c.client.tasks.wait("wi", JOB, timeout=60)
        for name in ["long", *(f"q{i}" for i in range(QUEUED))]:
            t = await c.client.tasks.get("wi", JOB, name)
            assert t.execution_info.exit_code == 0, name


async def test_terminating_a_job_ends_its_queued_tasks_unrun(nursery, tmp_path):
    async with _one_slot_short_job(nursery, tmp_path) as c:
        gate = os.path.join(str(tmp_path), "gate2")
        marks = os.path.join(str(tmp_path), "marks")
        os.makedirs(marks)
        os.chmod(marks, 0o777)
        tvm = await _queued_behind_a_long_task(
            c, gate, [f"touch {marks}/q{i}" for i in range(QUEUED)]
        )
        await c.client.jobs.terminate("wi", JOB)

        async def all_done():
            ts = await c.client.tasks.list("wi", JOB)
            return all(t.state == "completed" for t in ts) and ts

        await c.wait_for(all_done, timeout=30, what="every task completed after terminate")
        await trio.sleep(0.5)
        assert os.listdir(marks) == []  # none of the queued ones ran
        assert not tvm.running
