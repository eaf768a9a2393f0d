"""A task's affinity (Azure's affinityInfo) in the pure core: a soft hint. A task that names a TVM
with a free slot runs there; when that TVM is full, or unknown, it runs where it is dealt; the other
tasks fill what is left, under both fill types. Azure's `TVM:<name>` form is read as the name."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from protocol import messages as pm
from tests.unit.test_core_tasks import Clock

JOB = "job-0000000001"


def _core(fill: str = "spread") -> tuple[CoordinatorState, str, str]:
    """Two TVMs with two slots each; returns the core and the TVMs' names in dealing order."""
    core = CoordinatorState("acct", clock=Clock())
    for i in range(2):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(
        m.PoolAdd(
            name="p", target_dedicated=2, max_tasks_per_vm=2, vm_size="medium", tvm_fill_type=fill
        )
    )
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.take_effects()
    first, second = sorted(core.tvms)
    return core, first, second


def _placed(core: CoordinatorState, tasks: list[tuple[str, str | None]]) -> dict[str, str]:
    core.add_tasks(
        "wi", JOB, [m.TaskAdd(name=n, command_line="run", affinity_id=a) for n, a in tasks]
    )
    core.schedule()
    return {
        send.msg.spec.task: core.get_task("wi", JOB, send.msg.spec.task)[1].tvm or ""
        for send in core.take_effects().sends
        if isinstance(send.msg, pm.RunTask)
    }


@pytest.mark.parametrize("fill", ["spread", "pack"])
def test_tasks_go_to_the_tvm_they_name_while_it_has_room(fill: str) -> None:
    core, first, second = _core(fill)
    # Without hints, spread deals t0 to the first TVM and pack fills the first TVM first.
    placed = _placed(core, [("t0", f"TVM:{second}"), ("t1", second), ("t2", None)])
    assert placed == {"t0": second, "t1": second, "t2": first}


def test_a_full_or_unknown_tvm_is_only_a_hint() -> None:
    core, first, second = _core()
    placed = _placed(core, [("t0", second), ("t1", second), ("t2", second), ("t3", "no-such-tvm")])
    assert [placed[t] for t in ("t0", "t1")] == [second, second]
    assert placed["t2"] == first  # its TVM was full: it ran elsewhere, not waited
    assert placed["t3"] == first
    _, t = core.get_task("wi", JOB, "t2")
    assert t.affinity == second  # kept (a retry prefers it again)


@pytest.mark.parametrize("bad", ["x" * 129, "a\0b"])
def test_a_bad_affinity_is_refused_with_nothing_added(bad: str) -> None:
    core, _, _ = _core()
    with pytest.raises(ApiError) as exc:
        core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="run", affinity_id=bad))
    assert (exc.value.status, exc.value.code) == (400, "InvalidPropertyValue")
    assert exc.value.values.get("field") == "affinityId"
    assert core.get_job("wi", JOB).tasks == {}
