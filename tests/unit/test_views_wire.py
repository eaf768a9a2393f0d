"""REST bodies show counters and priorities even when they are 0 (as Azure does); absent optional
values are still omitted rather than sent as null."""

import msgspec

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.rest.views import job_view, task_view, workitem_view


def test_zero_counters_and_priority_are_on_the_wire() -> None:
    core = CoordinatorState("acct", clock=lambda: 1000.0)
    core.add_pool(m.PoolAdd(name="p"))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.add_task("wi", "job-0000000001", m.TaskAdd(name="t", command_line="/bin/true"))
    job, task = core.get_task("wi", "job-0000000001", "t")
    body = msgspec.json.decode(msgspec.json.encode(task_view(job, task)))
    assert body["executionInfo"]["retryCount"] == 0
    assert body["executionInfo"]["requeueCount"] == 0
    assert "endTime" not in body["executionInfo"]  # not completed: absent, not null
    wi = msgspec.json.decode(msgspec.json.encode(workitem_view(core.get_workitem("wi"))))
    assert wi["priority"] == 0
    counts = msgspec.json.decode(msgspec.json.encode(job_view(core, job)))["taskCounts"]
    assert counts == {"active": 1, "running": 0, "completed": 0, "succeeded": 0, "failed": 0}
