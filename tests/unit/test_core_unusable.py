"""Issue 5 §5: a TVM whose disk is (nearly) full is `unusable`: it gets no new tasks until space
comes back. Pure core, fake clock, no sockets."""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from protocol import messages as pm

GIB = 1024**3


def _cluster() -> tuple[CoordinatorState, str]:
    core = CoordinatorState("acct", clock=lambda: 1000.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t", disk_bytes=10 * GIB))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    (tvm,) = core.tvms.values()
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.take_effects()
    return core, tvm.rec.name


def test_full_disk_makes_tvm_unusable_and_keeps_tasks_off_until_space_returns() -> None:
    core, name = _cluster()
    assert core.tvms[name].rec.state == "idle"
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=10 * GIB - 10 * 1024 * 1024))
    assert core.tvms[name].rec.state == "unusable"
    core.add_task("wi", "job-0000000001", m.TaskAdd(name="t", command_line="/bin/true"))
    assert core.schedule() == 0
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=2 * GIB))
    assert core.tvms[name].rec.state == "idle"
    assert core.schedule() == 1


def test_heartbeat_without_disk_facts_changes_nothing() -> None:
    core, name = _cluster()
    core.agent_message("a0", pm.Heartbeat())
    assert core.tvms[name].rec.state == "idle"
