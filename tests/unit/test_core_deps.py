"""Pure core: task dependencies (waiting, satisfied, blocked, exit conditions, jobAction), what is
refused at add time with nothing added, the reverse index at scale, and a restart's rebuild."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core.deps import outcome, status
from coordinator.core.facade import CoordinatorState
from coordinator.core.records import TaskRec
from protocol import messages as pm
from tests.unit.test_core_foundation import JOB, Journal, _core, _done, _ready_cluster, _runs


def _deps_cluster(
    n_agents: int = 2, on_task_failure: str = "noaction"
) -> tuple[CoordinatorState, Journal]:
    core, _, j = _ready_cluster(n_agents=n_agents)
    core.add_workitem(
        m.WorkitemAdd(
            name="d",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            uses_task_dependencies=True,
            on_task_failure=on_task_failure,
        )
    )
    j.apply(core.take_effects())
    return core, j


def _t(name: str, *ids: str, ranges: tuple[tuple[int, int], ...] = (), **kw: object) -> m.TaskAdd:
    deps = (
        m.TaskDependencies(
            task_ids=list(ids), task_id_ranges=[m.TaskIdRange(start=a, end=b) for a, b in ranges]
        )
        if ids or ranges
        else None
    )
    return m.TaskAdd(name=name, command_line="x", depends_on=deps, **kw)  # type: ignore[arg-type]


def _run_all(core: CoordinatorState, codes: dict[str, int] | None = None) -> list[str]:
    """Schedule and complete what runs now (exit codes from `codes`, else 0); returns the names."""
    core.schedule()
    ran = []
    for agent, spec in _runs(core.take_effects()):
        _done(core, agent, spec, code=(codes or {}).get(spec.task, 0))
        ran.append(spec.task)
    return sorted(ran)


def _state(core: CoordinatorState, name: str) -> str:
    return core.get_task("d", JOB, name)[1].state


def test_a_dependent_waits_until_its_parents_succeed() -> None:
    core, _ = _deps_cluster()
    core.add_tasks("d", JOB, [_t("a"), _t("b"), _t("c", "a", "b")])
    job = core.get_job("d", JOB)
    assert status(job, job.tasks["c"]) == ("waiting", "waiting for 2 of 2 dependencies to complete")
    assert _run_all(core) == ["a", "b"]
    assert _run_all(core) == ["c"]
    assert _state(core, "c") == "completed"
    assert status(job, job.tasks["c"]) is None


def test_a_dependent_added_after_its_parent_succeeded_is_ready() -> None:
    core, _ = _deps_cluster()
    core.add_task("d", JOB, _t("a"))
    assert _run_all(core) == ["a"]
    core.add_task("d", JOB, _t("b", "a"))
    assert _run_all(core) == ["b"]


def test_a_failed_parent_blocks_and_its_reactivation_releases() -> None:
    core, _ = _deps_cluster()
    core.add_tasks("d", JOB, [_t("a"), _t("c", "a")])
    assert _run_all(core, {"a": 3}) == ["a"]
    assert _run_all(core) == []
    job = core.get_job("d", JOB)
    state, why = status(job, job.tasks["c"]) or ("", "")
    assert state == "blocked"
    assert "'a'" in why
    assert "exit code 3" in why
    assert _state(core, "c") == "active"
    # Blocked tasks are active: the job is not all complete, $ActiveTasks leaves them out.
    assert core.task_counts(job).active == 1
    core.reactivate_task("d", JOB, "a")
    assert _run_all(core) == ["a"]
    assert _run_all(core) == ["c"]


def test_exit_conditions_satisfy_on_failure_and_block_on_success() -> None:
    core, _ = _deps_cluster()
    sat = m.ExitConditions(
        exit_codes=[
            m.ExitCodeMapping(code=0, exit_options=m.ExitOptions(dependency_action="block"))
        ],
        exit_code_ranges=[
            m.ExitCodeRangeMapping(
                start=2, end=9, exit_options=m.ExitOptions(dependency_action="satisfy")
            )
        ],
    )
    core.add_tasks(
        "d",
        JOB,
        [
            _t("fails", exit_conditions=sat),
            _t("ok", exit_conditions=sat),
            _t("after_fail", "fails"),
            _t("after_ok", "ok"),
        ],
    )
    assert _run_all(core, {"fails": 5}) == ["fails", "ok"]
    assert _run_all(core) == ["after_fail"]
    assert _state(core, "after_ok") == "active"


def test_outcome_defaults_and_preprocessing_and_default() -> None:
    t = TaskRec(name="t", command_line="x", seq=1, created=0.0, exit_code=0)
    assert outcome(t) == ("satisfy", "none")
    t.exit_code = 1
    assert outcome(t) == ("block", "terminate")
    t.exit_conditions = m.ExitConditions(
        default=m.ExitOptions(dependency_action="satisfy", job_action="none"),
        pre_processing_error=m.ExitOptions(dependency_action="block"),
    )
    assert outcome(t) == ("satisfy", "none")
    t.exit_code, t.failure = None, ("UserError", "ResourceFileDownloadFailed", "404")
    assert outcome(t) == ("block", "terminate")
    t.failure = ("UserError", "FileUploadError", "x")
    assert outcome(t) == ("satisfy", "none")  # no fileUploadError: default


@pytest.mark.parametrize(
    ("tasks", "code"),
    [
        ([_t("c", "nope")], "TaskDependencyNotFound"),
        ([_t("c", "c")], "TaskDependencyCycle"),
        ([_t("c", ranges=((1, 5),))], "TaskDependencyNotFound"),
        ([_t("c", ranges=((5, 1),))], "InvalidPropertyValue"),
        ([_t("c", "x" * 64_001)], "TaskDependencyListTooLong"),
        ([_t("c", ranges=tuple((i, i) for i in range(1001)))], "TaskDependencyRangesTooLong"),
    ],
)
def test_bad_dependencies_are_refused_and_add_nothing(tasks: list[m.TaskAdd], code: str) -> None:
    core, j = _deps_cluster()
    with pytest.raises(ApiError) as ei:
        core.add_task("d", JOB, tasks[0])
    assert (ei.value.status, ei.value.code) == (400, code)
    assert core.get_job("d", JOB).tasks == {}
    assert core.take_effects().writes == []


def test_dependencies_need_the_job_flag() -> None:
    core, _, _ = _ready_cluster()
    core.add_task("wi", JOB, _t("a"))
    with pytest.raises(ApiError) as ei:
        core.add_task("wi", JOB, _t("b", "a"))
    assert ei.value.code == "TaskDependenciesNotSpecifiedOnJob"
    assert "b" not in core.get_job("wi", JOB).tasks


def test_a_collection_refuses_cycles_and_their_dependents_per_task() -> None:
    core, _ = _deps_cluster()
    res = core.add_tasks(
        "d",
        JOB,
        [
            _t("a"),
            _t("x", "y", "a"),
            _t("y", "x"),
            _t("behind", "y"),
            _t("bad name!"),
            _t("on_bad", "bad name!"),
            _t("fine", "a"),
        ],
    )
    got = {r.name: (r.status, (r.error or {}).get("code")) for r in res}
    assert got == {
        "a": ("success", None),
        "x": ("clienterror", "TaskDependencyCycle"),
        "y": ("clienterror", "TaskDependencyCycle"),
        "behind": ("clienterror", "TaskDependencyCycle"),
        "bad name!": ("clienterror", "InvalidPropertyValue"),
        "on_bad": ("clienterror", "TaskDependencyNotAdded"),
        "fine": ("success", None),
    }
    assert sorted(core.get_job("d", JOB).tasks) == ["a", "fine"]


def test_ranges_match_integer_ids_and_leading_zeros_are_one_id() -> None:
    core, _ = _deps_cluster()
    core.add_tasks("d", JOB, [_t("1"), _t("02"), _t("002"), _t("3"), _t("5a")])
    core.add_task("d", JOB, _t("after", ranges=((1, 3),)))
    assert core.get_task("d", JOB, "after")[1].deps == ["1", "02|002", "3"]  # "5a" is no integer
    # One of task 2's spellings fails, the other succeeds: the success satisfies it.
    ran: list[str] = []
    while step := _run_all(core, {"002": 1}):
        ran += step
    assert ran[-1] == "after"
    assert sorted(ran) == ["002", "02", "1", "3", "5a", "after"]


def test_ranges_see_tasks_added_and_deleted_between_adds() -> None:
    """The job's integer index is built once and then kept: later adds, deletes, re-adds and a
    collection's own tasks are all seen by the next range."""
    core, _ = _deps_cluster()
    core.add_tasks("d", JOB, [_t("1"), _t("2")])
    core.add_task("d", JOB, _t("a", ranges=((1, 2),)))  # builds the index
    assert core.get_task("d", JOB, "a")[1].deps == ["1", "2"]
    job = core.get_job("d", JOB)
    assert job.deps is not None
    kept = job.deps.ints
    core.add_tasks("d", JOB, [_t("3"), _t("03"), _t("b", ranges=((1, 3),))])  # batch and job
    assert core.get_task("d", JOB, "b")[1].deps == ["1", "2", "3|03"]
    assert job.deps.ints is kept  # kept up to date, not rebuilt by a walk of the job
    core.delete_task("d", JOB, "2")
    with pytest.raises(ApiError) as err:
        core.add_task("d", JOB, _t("c", ranges=((1, 3),)))
    assert err.value.code == "TaskDependencyNotFound"
    assert "'2'" in err.value.message
    core.delete_task("d", JOB, "03")
    core.add_task("d", JOB, _t("02"))
    core.add_task("d", JOB, _t("c", ranges=((1, 3),)))
    assert core.get_task("d", JOB, "c")[1].deps == ["1", "02", "3"]


def test_a_restart_keeps_waiting_and_blocked_dependents() -> None:
    core, j = _deps_cluster()
    core.add_tasks("d", JOB, [_t("a"), _t("bad"), _t("w", "a"), _t("blk", "bad")])
    j.apply(core.take_effects())
    core.schedule()
    runs = {spec.task: (a, spec) for a, spec in _runs(j.apply(core.take_effects()))}
    _done(core, *runs["bad"], code=2)
    j.apply(core.take_effects())
    again, _, _ = _core()
    again.restore(j.load())
    job = again.get_job("d", JOB)
    assert [t.name for t in job.queue] == ["a"]  # only the ready task is queued
    assert (status(job, job.tasks["blk"]) or ("",))[0] == "blocked"
    assert (status(job, job.tasks["w"]) or ("",))[0] == "waiting"
    assert job.deps is not None
    assert set(job.deps.pending) == {"w", "blk"}


def test_job_action_terminate_on_failure() -> None:
    core, _ = _deps_cluster(on_task_failure="performexitoptionsjobaction")
    core.add_task("d", JOB, _t("a"))
    _run_all(core, {"a": 4})
    assert core.get_job("d", JOB).rec.terminate_reason == "TaskFailed"


def test_job_action_disable_from_an_exit_code_and_none_on_success() -> None:
    core, _ = _deps_cluster(on_task_failure="performexitoptionsjobaction")
    ec = m.ExitConditions(
        exit_codes=[m.ExitCodeMapping(code=9, exit_options=m.ExitOptions(job_action="disable"))]
    )
    core.add_tasks("d", JOB, [_t("ok"), _t("a", exit_conditions=ec)])
    _run_all(core, {"a": 9})
    job = core.get_job("d", JOB)
    assert job.rec.state in ("disabling", "disabled")
    assert job.rec.terminate_reason is None


def test_job_action_needs_perform_exit_options() -> None:
    core, _ = _deps_cluster()
    ec = m.ExitConditions(default=m.ExitOptions(job_action="terminate"))
    with pytest.raises(ApiError) as ei:
        core.add_task("d", JOB, _t("a", exit_conditions=ec))
    assert ei.value.code == "InvalidPropertyValue"
    assert "onTaskFailure" in ei.value.message


def _sim(core: CoordinatorState) -> int:
    """Run everything to the end on the agents' behalf; returns how many tasks ran."""
    n = 0
    while True:
        core.schedule()
        runs = _runs(core.take_effects())
        if not runs:
            return n
        for agent, spec in runs:
            core.agent_message(
                agent,
                pm.TaskCompleted(
                    key=spec.key, attempt=spec.attempt, exit_code=0, start_time=0.0, end_time=0.0
                ),
            )
            n += 1


def test_a_long_chain_and_a_wide_fan_in_run_in_order() -> None:
    core, _ = _deps_cluster(n_agents=4)
    n = 2_000
    chain = [_t("c0")] + [_t(f"c{i}", f"c{i - 1}") for i in range(1, n)]
    for k in range(0, n, 100):
        assert all(r.status == "success" for r in core.add_tasks("d", JOB, chain[k : k + 100]))
    fan = [_t(str(i)) for i in range(n)]
    for k in range(0, n, 100):
        core.add_tasks("d", JOB, fan[k : k + 100])
    core.add_task("d", JOB, _t("sink", ranges=((0, n - 1),)))
    job = core.get_job("d", JOB)
    assert len(job.queue) == 1 + n  # c0 and the fan: the waiting ones are not queued
    assert _sim(core) == 2 * n + 1
    assert all(t.state == "completed" for t in job.tasks.values())
    assert job.tasks["sink"].exit_code == 0


def test_active_tasks_metric_leaves_out_waiting_tasks() -> None:
    core, _ = _deps_cluster(n_agents=0)
    core.add_tasks("d", JOB, [_t("a"), _t("b", "a"), _t("c", "b")])
    now = core.clock()
    core.autoscale._sample_metrics(now)
    series = core.metrics.visible("p", now, 0.0)
    assert [s.value for s in series["ActiveTasks"]] == [1.0]
    assert [s.value for s in series["PendingTasks"]] == [1.0]
    assert core.task_counts(core.get_job("d", JOB)).active == 3
