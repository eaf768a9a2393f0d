"""Issue 6: schedules, priorities, job operations and bad input through the real REST API.

The schedule test drives the coordinator's clock (an offset added to real time) instead of waiting
minutes; everything else is real (coordinator, SQLite, HTTP, agent processes).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from coordinator.client import AsyncClient, BatchError, task_spec
from coordinator.common import models as m
from coordinator.common.timeutil import rfc3339
from tests.harness import cluster_ctx

J1 = "job-0000000001"


class OffsetClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_one_minute_recurrence_creates_job_1_2_3_then_completes(nursery, tmp_path):
    clock = OffsetClock()
    async with cluster_ctx(nursery, tmp_path, agents=0, heartbeat_timeout=1.0, clock=clock) as c:
        start = clock()
        await c.client.workitems.add(
            "every-minute",
            "nopool",
            on_all_tasks_complete="terminatejob",
            schedule=m.Schedule(recurrence_interval="PT1M", do_not_run_after=rfc3339(start + 150)),
        )

        async def names() -> list[str]:
            return sorted(j.name for j in await c.client.jobs.list("every-minute"))

        assert await names() == [J1]

        async def completed(n: int) -> bool:
            jobs = await c.client.jobs.list("every-minute")
            return len(jobs) >= n and all(j.state == "completed" for j in jobs)

        await c.wait_for(lambda: completed(1), timeout=10, what="job 1 completed")
        for n in (2, 3):
            clock.offset += 61
            await c.wait_for(
                lambda n=n: completed(n), timeout=10, what=f"job {n} created and completed"
            )
        assert await names() == [J1, "job-0000000002", "job-0000000003"]
        jobs = {j.name: j for j in await c.client.jobs.list("every-minute")}
        assert all(j.state == "completed" for j in jobs.values())
        assert jobs[J1].execution_info.terminate_reason == "AllTasksComplete"
        assert (
            jobs[J1].creation_time
            < jobs["job-0000000002"].creation_time
            < jobs["job-0000000003"].creation_time
        )

        async def wi_done() -> bool:
            return (await c.client.workitems.get("every-minute")).state == "completed"

        clock.offset += 61  # 180 s is after doNotRunAfter: no job 4, the workitem completes
        await c.wait_for(wi_done, timeout=10, what="workitem completed")
        wi = await c.client.workitems.get("every-minute")
        assert wi.execution_info.recent_job == "job-0000000003"
        assert wi.execution_info.next_run_time is None
        assert await names() == [J1, "job-0000000002", "job-0000000003"]


async def test_priority_500_job_starts_before_earlier_priority_0_job(nursery, tmp_path):
    py = sys.executable
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("block", "p", priority=1000)
        await c.client.tasks.add("block", J1, "blocker", f'{py} -c "import time; time.sleep(2)"')
        await c.wait_for(lambda: _state(c, "block", "blocker", "running"), what="blocker running")
        await c.client.workitems.add("low", "p", priority=0)
        await c.client.tasks.add_collection(
            "low", J1, [task_spec(f"l{i}", f"{py} -c pass") for i in range(2)]
        )
        await c.client.workitems.add("high", "p", priority=500)
        await c.client.tasks.add_collection(
            "high", J1, [task_spec(f"h{i}", f"{py} -c pass") for i in range(2)]
        )
        # PATCH: a third job raised above both while waiting goes first of all.
        await c.client.workitems.add("late", "p")
        await c.client.tasks.add("late", J1, "z0", f"{py} -c pass")
        job = await c.client.jobs.update("late", J1, priority=900)
        assert job.priority == 900
        for wi in ("low", "high", "late"):
            await c.client.tasks.wait(wi, J1, timeout=60)
        starts = []
        for wi in ("low", "high", "late"):
            for t in await c.client.tasks.list(wi, J1):
                starts.append((t.execution_info.start_time, t.name))
        assert [name for _, name in sorted(starts)] == ["z0", "h0", "h1", "l0", "l1"]


async def _state(c, wi: str, task: str, state: str) -> bool:
    return (await c.client.tasks.get(wi, J1, task)).state == state


async def test_job_operations_and_bad_input(nursery, tmp_path):
    py = sys.executable
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 1)
        cl = c.client
        # Bad input: clear errors, nothing stored.
        for kw, field in [
            ({"priority": 1001}, "priority"),
            ({"schedule": m.Schedule(recurrence_interval="PT30S")}, "schedule.recurrenceInterval"),
            (
                {
                    "schedule": m.Schedule(
                        do_not_run_until="2030-01-02T00:00:00Z",
                        do_not_run_after="2030-01-01T00:00:00Z",
                    )
                },
                "schedule.doNotRunAfter",
            ),
        ]:
            with pytest.raises(BatchError) as exc:
                await cl.workitems.add("bad", "p", **kw)
            assert (exc.value.status, exc.value.code, exc.value.values.get("field")) == (
                400,
                "InvalidPropertyValue",
                field,
            )
        assert await cl.workitems.list() == []

        await cl.workitems.add("wi", "p")
        with pytest.raises(BatchError) as exc:
            await cl.jobs.update("wi", J1, priority=-1001)
        assert exc.value.status == 400
        await cl.tasks.add("wi", J1, "sleeper", f'{py} -c "import time; time.sleep(60)"')
        await c.wait_for(lambda: _state(c, "wi", "sleeper", "running"), what="sleeper running")
        # Disable (requeue) -> the running task goes back to active; enable -> it runs again.
        await cl.jobs.disable("wi", J1, disable_tasks="requeue")
        await c.wait_for(lambda: _job_state(c, "wi", "disabled"), what="job disabled")
        t = await cl.tasks.get("wi", J1, "sleeper")
        assert t.state == "active"
        assert t.execution_info.requeue_count == 1
        await cl.jobs.enable("wi", J1)
        await c.wait_for(
            lambda: _state(c, "wi", "sleeper", "running"), what="sleeper running again"
        )
        # Terminate with a reason: the running task is killed, the job completes.
        await cl.jobs.terminate("wi", J1, reason="enough for today")
        await c.wait_for(lambda: _job_state(c, "wi", "completed"), what="job completed")
        job = await cl.jobs.get("wi", J1)
        assert job.execution_info.terminate_reason == "enough for today"
        assert job.execution_info.end_time is not None
        t = await cl.tasks.get("wi", J1, "sleeper")
        assert t.state == "completed"
        assert t.execution_info.scheduling_error.code == "TaskEnded"
        with pytest.raises(BatchError) as exc:
            await cl.tasks.add("wi", J1, "late", f"{py} -c pass")
        assert (exc.value.status, exc.value.code) == (409, "JobCompleted")
        assert [x.name for x in await cl.tasks.list("wi", J1)] == ["sleeper"]
        # The workitem (no schedule) completed with its only job; delete removes everything.
        assert (await cl.workitems.get("wi")).state == "completed"
        task_dir = os.path.join(c.agents[0].root, "tasks", "wi", J1, "sleeper")
        assert _exists(task_dir)
        await cl.jobs.delete("wi", J1)
        assert await cl.jobs.list("wi") == []
        await c.wait_for(lambda: not _exists(task_dir), what="task files removed with the job")
        # Workitem operations.
        await cl.workitems.add("w2", "p")
        await cl.workitems.disable("w2")
        assert (await cl.workitems.get("w2")).state == "disabled"
        await cl.workitems.enable("w2")
        await cl.workitems.terminate("w2")
        await c.wait_for(lambda: _wi_state(c, "w2", "completed"), what="workitem completed")
        assert (
            await cl.jobs.get("w2", J1)
        ).execution_info.terminate_reason == "TerminateJobSchedule"
        with pytest.raises(BatchError) as exc:
            await cl.workitems.disable("w2")
        assert (exc.value.status, exc.value.code) == (409, "WorkItemCompleted")
        await cl.workitems.delete("w2")
        # A forged job credential is refused.
        async with AsyncClient(c.rc.endpoint, token="wi.job-0000000001.forged") as forged:
            with pytest.raises(BatchError) as exc:
                await forged.jobs.list("wi")
            assert exc.value.status == 401


async def _job_state(c, wi: str, state: str) -> bool:
    return (await c.client.jobs.get(wi, J1)).state == state


async def _wi_state(c, wi: str, state: str) -> bool:
    return (await c.client.workitems.get(wi)).state == state


def _exists(path: str) -> bool:
    return os.path.exists(path)
