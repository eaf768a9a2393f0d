"""Job preparation and release tasks in the pure core: the placement gate, retries, barred TVMs,
release at the job's end, refusals, and the journal rows a restart rebuilds them from."""

from __future__ import annotations

from typing import Any

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from coordinator.core.instructions import Effects
from protocol import messages as pm

J1 = "job-0000000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(n_agents: int = 2, slots: int = 1, **pool: Any) -> CoordinatorState:
    core = CoordinatorState("acct", clock=Clock(), heartbeat_timeout=10.0)
    for i in range(n_agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t", cores=4))
    core.add_pool(
        m.PoolAdd(
            name="p", target_dedicated=n_agents, max_tasks_per_vm=slots, vm_size="large", **pool
        )
    )
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core


def _wi(core: CoordinatorState, name: str = "wi", **kw: object) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name=name, job_execution_environment=m.JobExecutionEnvironment(pool_name="p"), **kw
        )  # type: ignore[arg-type]
    )


def _sends(fx: Effects) -> list[tuple[str, pm.Msg]]:
    return [(agent, msg) for agent, msg in map(astuple, fx.sends)]


def _runs(core: CoordinatorState) -> list[tuple[str, pm.TaskSpec]]:
    core.schedule()
    return [(a, msg.spec) for a, msg in _sends(core.take_effects()) if isinstance(msg, pm.RunTask)]


def _done(core: CoordinatorState, agent: str, spec: pm.TaskSpec, code: int = 0) -> None:
    now = core.clock()
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt, exit_code=code, start_time=now, end_time=now
        ),
    )


PREP = m.JobPreparationTask(command_line="/bin/true")
RELEASE = m.JobReleaseTask(command_line="/bin/true")


def test_prep_runs_once_per_tvm_before_the_jobs_tasks():
    core = _core(n_agents=2)
    _wi(core, job_preparation_task=PREP, job_release_task=RELEASE)
    for i in range(4):
        core.add_task("wi", J1, m.TaskAdd(name=f"t{i}", command_line="run"))
    runs = _runs(core)
    # Only preparation runs: one per TVM, none of the job's tasks yet.
    assert sorted(s.task for _, s in runs) == ["jobpreparation", "jobpreparation"]
    assert {s.kind for _, s in runs} == {"jobprep"}
    assert len({a for a, _ in runs}) == 2
    for agent, spec in runs:
        _done(core, agent, spec)
    tasks = _runs(core)
    assert sorted(s.task for _, s in tasks) == ["t0", "t1"]
    assert all(s.job_prep == "jobpreparation" and s.kind == "" for _, s in tasks)
    for agent, spec in tasks:
        _done(core, agent, spec)
    again = _runs(core)
    assert sorted(s.task for _, s in again) == ["t2", "t3"]  # no second preparation


def test_failed_prep_bars_the_tvm_after_its_retries():
    core = _core(n_agents=1)
    prep = m.JobPreparationTask(
        command_line="/bin/false", task_constraints=m.TaskConstraints(max_task_retry_count=1)
    )
    _wi(core, job_preparation_task=prep)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    [(agent, first)] = _runs(core)
    _done(core, agent, first, code=1)
    fx = core.take_effects()
    [retry] = [msg.spec for _, msg in _sends(fx) if isinstance(msg, pm.RunTask)]
    assert retry.key == first.key
    assert retry.attempt != first.attempt
    _done(core, agent, retry, code=1)
    assert _runs(core) == []  # barred: the task stays active
    _, task = core.get_task("wi", J1, "t")
    assert task.state == "active"
    [rec] = core.job_prep_status("wi", J1)
    assert rec.prep is not None
    assert (rec.prep.state, rec.prep.exit_code, rec.prep.retry_count) == ("completed", 1, 1)


def test_no_wait_for_success_lets_tasks_run_beside_the_prep():
    core = _core(n_agents=1, slots=2)
    prep = m.JobPreparationTask(command_line="/bin/false", wait_for_success=False)
    _wi(core, job_preparation_task=prep)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    assert sorted(s.task for _, s in _runs(core)) == ["jobpreparation", "t"]


def test_release_runs_where_prep_ran_and_holds_the_job_in_terminating():
    core = _core(n_agents=2)
    _wi(core, job_preparation_task=PREP, job_release_task=RELEASE)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    [(agent, prep)] = _runs(core)
    _done(core, agent, prep)
    [(_, task)] = _runs(core)
    _done(core, agent, task)
    core.terminate_job("wi", J1)
    fx = core.take_effects()
    releases = [
        (a, msg.spec)
        for a, msg in _sends(fx)
        if isinstance(msg, pm.RunTask) and msg.spec.kind == "jobrelease"
    ]
    assert [(a, s.task) for a, s in releases] == [(agent, "jobrelease")]
    assert releases[0][1].max_wall_clock_s == 900.0
    core.tick()
    assert core.get_job("wi", J1).rec.state == "terminating"
    _done(core, agent, releases[0][1])
    core.tick()
    assert core.get_job("wi", J1).rec.state == "completed"
    [rec] = core.job_prep_status("wi", J1)
    assert rec.release is not None
    assert rec.release.state == "completed"


def test_prep_records_survive_a_restart_and_go_with_their_job(open_store: Any):
    """Through the real journal: SQLite, and PostgreSQL where it exists (`open_store`)."""
    store = open_store("j.db")
    core = _core(n_agents=1)
    _wi(core, job_preparation_task=PREP, job_release_task=RELEASE)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    core.schedule()
    fx = core.take_effects()
    [spec] = [msg.spec for _, msg in _sends(fx) if isinstance(msg, pm.RunTask)]
    _done(core, "a0", spec)
    store.apply(fx.writes + core.take_effects().writes)
    fresh = CoordinatorState("acct", clock=Clock(), epoch=2)
    fresh.restore(store.load())
    [rec] = fresh.job_prep_status("wi", J1)
    assert rec.prep is not None
    assert rec.prep.succeeded
    assert rec.release_name == "jobrelease"
    # Deleted while active: its release runs first, and the record stays until it has ended.
    core.delete_workitem("wi")
    fx = core.take_effects()
    store.apply(fx.writes)
    assert [k for k, _, _ in store.load() if k == "jobprep"] == ["jobprep"]
    [release] = [m_.spec for _, m_ in _sends(fx) if isinstance(m_, pm.RunTask)]
    _done(core, "a0", release)
    store.apply(core.take_effects().writes)
    assert [k for k, _, _ in store.load() if k == "jobprep"] == []


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"job_release_task": RELEASE}, "InvalidPropertyValue"),
        (
            {"job_preparation_task": m.JobPreparationTask(command_line="  ")},
            "MissingRequiredProperty",
        ),
        (
            {"job_preparation_task": m.JobPreparationTask(name="bad name", command_line="x")},
            "InvalidPropertyValue",
        ),
        (
            {
                "job_preparation_task": PREP,
                "job_release_task": m.JobReleaseTask(command_line="x", max_wall_clock_time="PT16M"),
            },
            "InvalidPropertyValue",
        ),
        (
            {
                "job_preparation_task": m.JobPreparationTask(
                    command_line="x",
                    environment_settings=[m.EnvironmentSetting(name="AZ_BATCH_NODE_ID", value="x")],
                )
            },
            "ReservedEnvironmentVariable",
        ),
    ],
)
def test_bad_specs_are_refused_and_leave_nothing(kw: dict[str, object], code: str):
    core = _core(n_agents=1)
    with pytest.raises(ApiError) as info:
        _wi(core, **kw)
    assert info.value.code == code
    assert core.workitems == {}
    assert core.jobs == {}
    assert core.take_effects().writes == []


def test_task_named_like_prep_is_refused():
    core = _core(n_agents=1)
    _wi(core, job_preparation_task=PREP, job_release_task=RELEASE)
    for name, code in (
        ("jobpreparation", "TaskIdSameAsJobPreparationTask"),
        ("JobRelease", "TaskIdSameAsJobReleaseTask"),
    ):
        with pytest.raises(ApiError) as info:
            core.add_task("wi", J1, m.TaskAdd(name=name, command_line="x"))
        assert info.value.code == code
    assert core.get_job("wi", J1).tasks == {}


def test_status_without_prep_is_a_conflict():
    core = _core(n_agents=1)
    _wi(core)
    with pytest.raises(ApiError) as info:
        core.job_prep_status("wi", J1)
    assert info.value.code == "JobPreparationTaskNotSpecified"


def test_deleting_an_active_job_runs_its_release_then_forgets_it():
    core = _core(n_agents=1)
    _wi(core, job_preparation_task=PREP, job_release_task=RELEASE)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    [(agent, prep)] = _runs(core)
    _done(core, agent, prep)
    core.take_effects()
    core.delete_workitem("wi")
    fx = core.take_effects()
    [release] = [msg.spec for _, msg in _sends(fx) if isinstance(msg, pm.RunTask)]
    assert release.kind == "jobrelease"
    assert core.store.job_preps  # kept until the release has ended
    _done(core, agent, release)
    fx = core.take_effects()
    deleted = sorted(msg.key for _, msg in _sends(fx) if isinstance(msg, pm.DeleteTaskFiles))
    assert deleted == [f"wi/{J1}/jobpreparation", f"wi/{J1}/jobrelease"]
    assert core.store.job_preps == {}
    assert [(w.kind, w.body) for w in fx.writes if w.kind == "jobprep"] == [("jobprep", None)]


def test_a_prep_lost_with_its_agent_runs_again():
    core = _core(n_agents=1)
    _wi(core, job_preparation_task=PREP)
    core.add_task("wi", J1, m.TaskAdd(name="t", command_line="run"))
    [(agent, first)] = _runs(core)
    # A fresh agent process (it reports nothing): the run died with the old one.
    core.agent_disconnected(agent)
    core.agent_hello(pm.Hello(agent_id=agent, token="t", cores=4))
    tvm = next(iter(core.tvms.values()))
    core.agent_message(agent, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    [(_, again)] = _runs(core)
    assert again.kind == "jobprep"
    assert again.attempt != first.attempt
    _done(core, agent, first)  # the lost run's late result changes nothing
    assert _runs(core) == []
    _done(core, agent, again)
    assert [s.task for _, s in _runs(core)] == ["t"]


def test_reboot_and_reimage_run_the_prep_again():
    core = _core(n_agents=1)
    _wi(core, job_preparation_task=PREP)
    core.add_task("wi", J1, m.TaskAdd(name="t0", command_line="run"))
    [(agent, prep)] = _runs(core)
    _done(core, agent, prep)
    [(_, t0)] = _runs(core)
    _done(core, agent, t0)
    tvm = next(iter(core.tvms.values()))
    for op in (core.reboot_tvm, core.reimage_tvm):
        op("p", tvm.rec.name)
        core.agent_message(agent, pm.TvmReady(tvm_name=tvm.rec.name))
        core.take_effects()
        core.add_task("wi", J1, m.TaskAdd(name=f"after-{op.__name__}", command_line="run"))
        [(_, again)] = _runs(core)
        assert again.kind == "jobprep", op.__name__
        _done(core, agent, again)
        [(_, task)] = _runs(core)
        assert task.task == f"after-{op.__name__}"
        _done(core, agent, task)


def test_job_manager_waits_for_the_prep_on_its_tvm():
    core = _core(n_agents=1)
    jm = m.JobManager(name="jm", command_line="manage")
    _wi(core, job_manager=jm, job_preparation_task=PREP)
    [(agent, prep)] = _runs(core)
    assert prep.kind == "jobprep"
    assert _runs(core) == []  # the manager waits while the preparation runs
    _done(core, agent, prep)
    [(_, manager)] = _runs(core)
    assert (manager.task, manager.job_manager, manager.job_prep) == ("jm", True, "jobpreparation")


def test_prep_named_like_the_job_manager_is_refused():
    core = _core(n_agents=1)
    with pytest.raises(ApiError) as info:
        _wi(
            core,
            job_manager=m.JobManager(name="setup", command_line="x"),
            job_preparation_task=m.JobPreparationTask(name="setup", command_line="y"),
        )
    assert info.value.code == "InvalidPropertyValue"
    assert core.workitems == {}


def _gang_task(core: CoordinatorState, name: str, n: int) -> None:
    core.add_task(
        "wi",
        J1,
        m.TaskAdd(
            name=name,
            command_line="app",
            multi_instance_settings=m.MultiInstanceSettings(
                number_of_instances=n, coordination_command_line="coord"
            ),
        ),
    )


def test_a_multi_instance_task_waits_for_the_prep_on_every_tvm_of_its_gang():
    core = _core(n_agents=3, communication=True)
    _wi(core, job_preparation_task=PREP)
    _gang_task(core, "mpi", 2)
    preps = _runs(core)
    # The preparation starts on the TVMs the gang would take; no instance before it succeeded.
    assert [s.kind for _, s in preps] == ["jobprep", "jobprep"]
    _done(core, *preps[0])
    assert _runs(core) == []  # one TVM of two is ready: the gang still waits
    _done(core, *preps[1])
    subs = _runs(core)
    assert sorted(s.key for _, s in subs) == [f"wi/{J1}/mpi~0", f"wi/{J1}/mpi~1"]
    assert {a for a, _ in subs} == {a for a, _ in preps}
    assert all(s.job_prep == "jobpreparation" for _, s in subs)


def test_a_gang_avoids_tvms_where_the_prep_failed():
    core = _core(n_agents=3, communication=True)
    prep = m.JobPreparationTask(command_line="/bin/false")
    _wi(core, job_preparation_task=prep)
    _gang_task(core, "mpi", 2)
    preps = _runs(core)
    assert len(preps) == 2
    _done(core, *preps[0], code=1)  # barred there (no retries)
    _done(core, *preps[1])
    third = _runs(core)
    # The third TVM gets its preparation; the failed one is never part of the gang.
    assert [s.kind for _, s in third] == ["jobprep"]
    assert third[0][0] not in {preps[0][0], preps[1][0]}
    _done(core, *third[0])
    subs = _runs(core)
    assert {a for a, _ in subs} == {preps[1][0], third[0][0]}
    assert {s.command_line for _, s in subs} == {"coord"}


@pytest.mark.parametrize("which", ["job_manager", "job_preparation_task", "job_release_task"])
@pytest.mark.parametrize(
    ("bad", "suffix", "code"),
    [
        ({"command_line": " "}, "commandLine", "MissingRequiredProperty"),
        ({"name": "no spaces"}, "name", "InvalidPropertyValue"),
        (
            {"resource_files": [m.ResourceFile(blob_source="https://x/y", file_path="../up")]},
            "resourceFiles[0].filePath",
            "InvalidResourceFilePath",
        ),
        (
            {"environment_settings": [m.EnvironmentSetting(name="AZ_BATCH_NODE_ID", value="x")]},
            "environmentSettings",
            "ReservedEnvironmentVariable",
        ),
    ],
)
def test_each_of_a_jobs_own_tasks_is_checked_under_its_own_field(
    which: str, bad: dict[str, Any], suffix: str, code: str
):
    cls: Any = {
        "job_manager": m.JobManager,
        "job_preparation_task": m.JobPreparationTask,
        "job_release_task": m.JobReleaseTask,
    }[which]
    spec = cls(**{"name": "own", "command_line": "x", **bad})
    kw: dict[str, object] = {which: spec}
    if which == "job_release_task":
        kw["job_preparation_task"] = PREP
    core = _core(n_agents=1)
    with pytest.raises(ApiError) as info:
        _wi(core, **kw)
    field = {
        "job_manager": "jobManager",
        "job_preparation_task": "jobPreparationTask",
        "job_release_task": "jobReleaseTask",
    }[which]
    assert (info.value.code, info.value.values.get("field")) == (code, f"{field}.{suffix}")
    assert core.workitems == {}
    assert core.take_effects().writes == []
