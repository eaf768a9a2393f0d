"""The core's transition tables: every state change not in an entity's table is refused, and one
driven through the composed core (a completed task put back in the queue) raises
IllegalTransition without changing the record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import pytest

from coordinator.common import models as m
from coordinator.core import CoordinatorState, IllegalTransition
from coordinator.core import states as st
from coordinator.core.tally import TaskTally
from protocol import messages as pm

ENTITY_STATES = {
    "task": get_args(st.TaskState),
    "tvm": get_args(st.TvmState),
    "job": get_args(st.JobState),
    "workitem": get_args(st.WorkitemState),
    "pool": get_args(st.PoolState),
    "alloc": get_args(st.AllocState),
    "prep": get_args(st.PrepState),
}


def _pairs(legal: bool) -> list[tuple[str, str, str]]:
    return [
        (entity, old, new)
        for entity, states in ENTITY_STATES.items()
        for old in states
        for new in states
        if old != new and (new in st.TABLES[entity][old]) == legal
    ]


ILLEGAL = _pairs(legal=False)
LEGAL = _pairs(legal=True)
MOVERS: dict[str, Callable[[Any, Any], str]] = {
    "task": lambda rec, new: st.move_task(rec, new, TaskTally()),
    "tvm": st.move_tvm,
    "job": st.move_job,
    "workitem": st.move_workitem,
    "pool": st.move_pool,
    "prep": st.move_prep,
}


class _Rec:
    def __init__(self, state: str) -> None:
        self.state = state
        self.exit_code: int | None = None
        self.failure: tuple[str, str, str] | None = None


class _AllocRec:
    def __init__(self, alloc_state: str) -> None:
        self.alloc_state = alloc_state


def test_every_table_covers_exactly_its_states():
    assert set(st.TABLES) == set(ENTITY_STATES)
    for entity, states in ENTITY_STATES.items():
        table = st.TABLES[entity]
        assert set(table) == set(states), entity
        for old, targets in table.items():
            assert targets <= set(states), (entity, old)
            assert old not in targets, (entity, old)  # staying is not a transition


@pytest.mark.parametrize(("entity", "old", "new"), ILLEGAL)
def test_illegal_transition_is_refused(entity: str, old: str, new: str):
    with pytest.raises(IllegalTransition) as info:
        st.check(entity, old, new)
    assert (info.value.entity, info.value.old, info.value.new) == (entity, old, new)
    if entity == "alloc":
        pool = _AllocRec(old)
        with pytest.raises(IllegalTransition):
            st.move_alloc(pool, new)
        assert pool.alloc_state == old  # refused before anything changed
    else:
        rec = _Rec(old)
        with pytest.raises(IllegalTransition):
            MOVERS[entity](rec, new)
        assert rec.state == old


@pytest.mark.parametrize(("entity", "old", "new"), LEGAL)
def test_legal_transition_is_taken(entity: str, old: str, new: str):
    if entity == "alloc":
        rec = _AllocRec(old)
        assert st.move_alloc(rec, new) == old
        assert rec.alloc_state == new
    else:
        plain = _Rec(old)
        assert MOVERS[entity](plain, new) == old
        assert plain.state == new


def test_staying_in_a_state_is_not_a_transition():
    for entity, states in ENTITY_STATES.items():
        for s in states:
            st.check(entity, s, s)


def test_the_tables_are_not_trivial():
    # Each entity has refused changes, and completed tasks/jobs/workitems are final.
    assert {e for e, _, _ in ILLEGAL} == set(ENTITY_STATES)
    assert st.TASK["completed"] == frozenset()
    assert st.JOB["completed"] == frozenset()
    assert st.WORKITEM["completed"] == frozenset()


def test_completed_task_cannot_be_requeued_through_the_core():
    core = CoordinatorState("acct", clock=lambda: 1000.0)
    core.agent_hello(pm.Hello(agent_id="a1", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    tvm = next(iter(core.tvms.values()))
    core.agent_message("a1", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="w", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.add_task("w", "job-0000000001", m.TaskAdd(name="t", command_line="true"))
    core.terminate_task("w", "job-0000000001", "t")
    job, task = core.get_task("w", "job-0000000001", "t")
    assert task.state == "completed"
    core.take_effects()
    with pytest.raises(IllegalTransition, match="task: illegal transition 'completed' -> 'active'"):
        core.runs.requeue(job, task)
    assert task.state == "completed"
    assert task.requeue_count == 0
    assert core.take_effects().writes == []
