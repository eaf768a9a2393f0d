"""A hostile client (or a job manager with its job-scoped token) against dependency resolution: many
overlapping `taskIdRanges` must cost what their union costs, not a pass over the job's
integer-named tasks per range (1,000 copies of one range over 100,000 tasks held the coordinator's
only thread for minutes). Counted in lookups of the job's integer index, not timed."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import deps as deps_mod
from coordinator.core.facade import CoordinatorState
from tests.unit.test_core_foundation import JOB, _ready_cluster

N = 2_000  # integer-named tasks in the job


class _CountingIndex(deps_mod.IntNames):
    lookups = 0

    def get(self, n: int) -> list[str] | None:
        type(self).lookups += 1
        return super().get(n)

    def __contains__(self, n: int) -> bool:
        type(self).lookups += 1
        return super().__contains__(n)


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> CoordinatorState:
    core, _, j = _ready_cluster()
    core.add_workitem(
        m.WorkitemAdd(
            name="d",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            uses_task_dependencies=True,
        )
    )
    for k in range(0, N, 100):
        core.add_tasks(
            "d", JOB, [m.TaskAdd(name=str(i), command_line="x") for i in range(k, k + 100)]
        )
    j.apply(core.take_effects())
    real = deps_mod.Deps._int_index

    def counting(self: deps_mod.Deps, job: Any, batch: Any) -> deps_mod.IntNames:
        _CountingIndex.lookups = 0
        found = real(self, job, batch)
        return _CountingIndex(found.kept, found.extra)

    monkeypatch.setattr(deps_mod.Deps, "_int_index", counting)
    return core


def _ranged(name: str, ranges: list[tuple[int, int]]) -> m.TaskAdd:
    return m.TaskAdd(
        name=name,
        command_line="x",
        depends_on=m.TaskDependencies(
            task_id_ranges=[m.TaskIdRange(start=a, end=b) for a, b in ranges]
        ),
    )


def test_a_thousand_copies_of_one_range_cost_what_one_costs(core: CoordinatorState) -> None:
    core.add_task("d", JOB, _ranged("fan-in", [(0, N - 1)] * 1_000))
    assert _CountingIndex.lookups <= N + 10
    _, t = core.get_task("d", JOB, "fan-in")
    assert sorted(int(u) for u in t.deps or ()) == list(range(N))


def test_overlapping_ranges_with_one_missing_id_are_refused_cheaply_naming_it(
    core: CoordinatorState,
) -> None:
    before = len(core.get_job("d", JOB).tasks)
    ranges = [(0, N - 1)] * 999 + [(N + 5, N + 5)]
    with pytest.raises(ApiError) as err:
        core.add_task("d", JOB, _ranged("bad", ranges))
    assert err.value.code == "TaskDependencyNotFound"
    assert f"'{N + 5}'" in str(err.value)
    assert _CountingIndex.lookups <= N + 10
    assert len(core.get_job("d", JOB).tasks) == before  # nothing added


def test_interleaved_overlapping_ranges_resolve_to_their_union(core: CoordinatorState) -> None:
    core.add_task("d", JOB, _ranged("u", [(10, 20), (15, 30), (31, 31), (5, 12), (100, 100)]))
    _, t = core.get_task("d", JOB, "u")
    assert sorted(int(u) for u in t.deps or ()) == [*range(5, 32), 100]


def test_one_add_resolves_at_most_its_dependency_budget(
    core: CoordinatorState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the bound: 100 tasks, each on the job's 2,000 integer-named tasks, are 200,000.
    assert deps_mod.MAX_DEPS_PER_ADD == 200_000
    res = core.add_tasks("d", JOB, [_ranged(f"at{i}", [(0, N - 1)]) for i in range(100)])
    assert [r.status for r in res] == ["success"] * 100, res[0]
    # Past it, the tasks that would exceed it are refused, naming the bound; the others are added.
    monkeypatch.setattr(deps_mod, "MAX_DEPS_PER_ADD", 5 * N)
    res = core.add_tasks("d", JOB, [_ranged(f"over{i}", [(0, N - 1)]) for i in range(8)])
    assert [r.status for r in res] == ["success"] * 5 + ["clienterror"] * 3, res
    assert res[5].error is not None
    assert res[5].error["code"] == "TooManyDependencies", res[5].error
    assert str(5 * N) in str(res[5].error["message"])
    job = core.get_job("d", JOB)
    assert {f"over{i}" for i in range(5)} <= set(job.tasks)
    assert not {f"over{i}" for i in range(5, 8)} & set(job.tasks)
    # The budget is per request: the next add resolves its own.
    core.add_task("d", JOB, _ranged("next", [(0, N - 1)]))
