"""The account's quotas in the pure core: pools (PoolQuotaReached) and workitems not yet completed,
i.e. jobs and job schedules (ActiveJobAndScheduleQuotaReached). A refused create changes nothing;
deleting (or, for workitems, completing) makes room again."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from tests.unit.test_core_tasks import Clock


def _workitem(name: str, auto: bool = False, schedule: m.Schedule | None = None) -> m.WorkitemAdd:
    env = (
        m.JobExecutionEnvironment(
            auto_pool_specification={
                "poolLifetimeOption": "job",
                "keepAlive": False,
                "pool": {"targetDedicated": 0},
            }
        )
        if auto
        else m.JobExecutionEnvironment(pool_name="p")
    )
    return m.WorkitemAdd(name=name, job_execution_environment=env, schedule=schedule)


def _refused(call: object, code: str, setting: str) -> None:
    with pytest.raises(ApiError) as exc:
        call()  # type: ignore[operator]
    assert (exc.value.status, exc.value.code) == (409, code)
    assert setting in exc.value.message


def test_pools_stop_at_max_pools_and_auto_pools_are_not_counted() -> None:
    core = CoordinatorState("acct", clock=Clock(), max_pools=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=0))
    core.add_workitem(_workitem("wi", auto=True))  # its job's auto pool: the workitem is counted
    core.add_pool(m.PoolAdd(name="q", target_dedicated=0))
    assert len(core.pools) == 3
    _refused(
        lambda: core.add_pool(m.PoolAdd(name="r", target_dedicated=0)),
        "PoolQuotaReached",
        "max-pools",
    )
    assert sorted(n for n in core.pools if not core.pools[n].auto_owner) == ["p", "q"]
    # A name that exists is still reported as such, not as the quota.
    with pytest.raises(ApiError) as exc:
        core.add_pool(m.PoolAdd(name="p", target_dedicated=0))
    assert exc.value.code == "PoolExists"
    core.delete_pool("q")
    core.tick()
    assert "q" not in core.pools
    core.add_pool(m.PoolAdd(name="r", target_dedicated=0))
    assert sorted(n for n in core.pools if not core.pools[n].auto_owner) == ["p", "r"]


def test_active_workitems_stop_at_max_active_jobs() -> None:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, max_active_jobs=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=0))
    core.add_workitem(_workitem("a"))
    core.add_workitem(_workitem("b", schedule=m.Schedule(recurrence_interval="PT1H")))
    pools, jobs = dict(core.pools), dict(core.jobs)
    for wi in (_workitem("c"), _workitem("d", auto=True)):
        _refused(
            lambda wi=wi: core.add_workitem(wi),
            "ActiveJobAndScheduleQuotaReached",
            "max-active-jobs",
        )
    # nothing of the refused ones: no workitem, job or auto pool
    assert sorted(core.workitems) == ["a", "b"]
    assert core.jobs.keys() == jobs.keys()
    assert core.pools.keys() == pools.keys()
    # A workitem that is terminating still counts; once completed it does not.
    core.terminate_workitem("a")
    _refused(
        lambda: core.add_workitem(_workitem("c")),
        "ActiveJobAndScheduleQuotaReached",
        "max-active-jobs",
    )
    clock.now += 1
    core.tick()
    assert core.workitems["a"].state == "completed"
    core.add_workitem(_workitem("c"))
    _refused(
        lambda: core.add_workitem(_workitem("d")),
        "ActiveJobAndScheduleQuotaReached",
        "max-active-jobs",
    )
    core.delete_workitem("b")
    core.add_workitem(_workitem("d"))
    assert sorted(core.workitems) == ["a", "c", "d"]
