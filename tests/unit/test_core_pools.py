"""Issue 5, pure core: VM sizes, start-task states, allocation and the provisioner hook, shrinking with
deallocation options, TVM operations, auto pools and bad input. Driven with agent events and a fake clock.
"""

from __future__ import annotations

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import WALL_CLOCK_EXIT_CODE, CoordinatorState, Provision
from protocol import messages as pm

JOB = "job-0000000001"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(agents: int = 2, provisioning: bool = False) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0, max_pool_size=50)
    core.provisioning_enabled = provisioning
    for i in range(agents):
        _hello(core, f"a{i}")
    core.take_effects()
    return core, clock


def _hello(core: CoordinatorState, agent: str) -> None:
    core.agent_hello(pm.Hello(agent_id=agent, token="t", cores=2, memory_bytes=4 * 1024**3))


def _ready_all(core: CoordinatorState, pool: str = "p") -> None:
    for tvm in list(core.tvms.values()):
        if tvm.rec.pool == pool and tvm.rec.state == "starting":
            core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))


def _pool(core: CoordinatorState, n: int, **kw: object) -> None:
    core.add_pool(m.PoolAdd(name="p", target_dedicated=n, **kw))  # type: ignore[arg-type]
    _ready_all(core)


def _job(core: CoordinatorState, pool: str = "p", tasks: int = 0) -> None:
    core.add_workitem(
        m.WorkitemAdd(
            name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name=pool)
        )
    )
    for i in range(tasks):
        core.add_task("wi", JOB, m.TaskAdd(name=f"t{i}", command_line="run"))
    core.schedule()


def _states(core: CoordinatorState) -> list[str]:
    return sorted(t.rec.state for t in core.tvms.values())


def _sends(core: CoordinatorState, typ: type) -> list:
    return [msg for _, msg in map(astuple, core.take_effects().sends) if isinstance(msg, typ)]


def _refused(fn, *args: object, status: int, code: str) -> ApiError:  # noqa: ANN001
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    return info.value


# ------------------------------------------------------------------ VM sizes


def test_vm_sizes_include_builtins_and_agent_sizes() -> None:
    core, _ = _core(1)
    sizes = core.vm_sizes()
    assert sizes["small"][:2] == (1, 1792)
    assert sizes["extralarge"][0] == 8
    assert sizes["native-2c-4096m"] == (2, 4096, 0, "agent")
    core.add_pool(m.PoolAdd(name="n", vm_size="native-2c-4096m", max_tasks_per_vm=8))
    assert core.pools["n"].spec.vm_size == "native-2c-4096m"


def test_max_tasks_per_vm_is_limited_by_cores() -> None:
    core, _ = _core(0)
    core.add_pool(m.PoolAdd(name="ok", vm_size="medium", max_tasks_per_vm=8))
    err = _refused(
        core.add_pool,
        m.PoolAdd(name="big", vm_size="medium", max_tasks_per_vm=9),
        status=400,
        code="InvalidPropertyValue",
    )
    assert "4 x the 2 core(s)" in err.message
    _refused(core.add_pool, m.PoolAdd(name="x", vm_size="huge"), status=400, code="InvalidVmSize")
    assert set(core.pools) == {"ok"}


def test_join_carries_the_size_memory() -> None:
    core, _ = _core(1)
    core.add_pool(m.PoolAdd(name="p", vm_size="small", target_dedicated=1, max_tasks_per_vm=2))
    (join,) = _sends(core, pm.JoinPool)
    assert join.memory_limit_bytes == 1792 * 1024 * 1024
    assert join.slots == 2


# ------------------------------------------------------------------ start task


def test_start_task_wait_for_success_states() -> None:
    core, clock = _core(1)
    core.add_pool(
        m.PoolAdd(
            name="p",
            target_dedicated=1,
            start_task=m.StartTask(command_line="setup", max_task_retry_count=1),
        )
    )
    (tvm,) = core.tvms.values()
    core.agent_message("a0", pm.StartTaskStarted(tvm_name=tvm.rec.name, start_time=clock.now))
    assert tvm.rec.state == "waitingforstarttask"
    _job(core, tasks=1)
    assert not tvm.running  # no tasks while the start task runs
    core.agent_message(
        "a0", pm.StartTaskStarted(tvm_name=tvm.rec.name, start_time=clock.now, retry_count=1)
    )
    core.agent_message(
        "a0",
        pm.StartTaskCompleted(
            exit_code=3, start_time=clock.now, end_time=clock.now + 1, retry_count=1
        ),
    )
    assert tvm.rec.state == "starttaskfailed"
    assert tvm.rec.start_task["exit_code"] == 3
    assert tvm.rec.start_task["retry_count"] == 1
    core.schedule()
    assert not tvm.running


def test_start_task_success_makes_the_tvm_idle() -> None:
    core, clock = _core(1)
    core.add_pool(
        m.PoolAdd(name="p", target_dedicated=1, start_task=m.StartTask(command_line="setup"))
    )
    (tvm,) = core.tvms.values()
    core.agent_message("a0", pm.StartTaskStarted(tvm_name=tvm.rec.name, start_time=clock.now))
    core.agent_message(
        "a0", pm.StartTaskCompleted(exit_code=0, start_time=clock.now, end_time=clock.now)
    )
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    assert tvm.rec.state == "idle"
    assert tvm.rec.start_task["state"] == "completed"


# ------------------------------------------------------------------ allocation and the provisioner


def test_resize_asks_the_provisioner_once_for_missing_agents() -> None:
    core, clock = _core(1, provisioning=True)
    _pool(core, 1)
    core.resize_pool("p", m.PoolResize(target_dedicated=3))
    assert core.pools["p"].alloc_state == "resizing"
    assert core.take_effects().provision == [Provision(2, "small", "p")]
    core.tick()
    assert core.take_effects().provision == []  # already asked
    _hello(core, "new1")
    _hello(core, "new2")
    _ready_all(core)
    assert core.pools["p"].alloc_state == "steady"
    assert len(core.tvms) == 3
    assert core.provision_pending == 0


def test_resize_timeout_goes_steady_with_error_and_stops_growing() -> None:
    core, clock = _core(0)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2, resize_timeout="PT1M"))
    clock.now += 61
    core.tick()
    pool = core.pools["p"]
    assert pool.alloc_state == "steady"
    assert pool.resize_error[0] == "AllocationTimedout"
    _hello(core, "late")
    assert len(core.tvms) == 0
    assert pool.alloc_state == "steady"
    core.resize_pool("p", m.PoolResize(target_dedicated=1))  # a new resize clears the error
    assert len(core.tvms) == 1
    assert pool.resize_error is None


def test_stop_resize_keeps_what_exists() -> None:
    core, _ = _core(1)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=3))
    core.stop_resize("p")
    pool = core.pools["p"]
    assert (pool.alloc_state, pool.target, pool.resize_error[0]) == ("steady", 1, "ResizeStopped")
    _refused(core.stop_resize, "p", status=409, code="PoolNotResizing")


# ------------------------------------------------------------------ shrinking


def test_shrink_requeue_moves_running_tasks() -> None:
    core, _ = _core(2)
    _pool(core, 2)
    _job(core, tasks=2)
    core.take_effects()
    core.resize_pool("p", m.PoolResize(target_dedicated=1))
    fx = core.take_effects()
    (leave,) = [msg for _, msg in map(astuple, fx.sends) if isinstance(msg, pm.LeavePool)]
    assert any(isinstance(msg, pm.CancelTask) for _, msg in map(astuple, fx.sends))
    gone = core.tvms[leave.tvm_name]
    assert gone.rec.state == "leavingpool"
    assert core.pools["p"].alloc_state == "resizing"
    core.agent_message(gone.rec.agent_id, pm.TvmLeft(tvm_name=leave.tvm_name))
    assert leave.tvm_name not in core.tvms
    assert core.agents[gone.rec.agent_id].tvm is None
    assert core.pools["p"].alloc_state == "steady"
    requeued = [t for t in core.jobs[f"wi/{JOB}"].tasks.values() if t.requeue_count]
    assert len(requeued) == 1
    core.schedule()
    assert (
        len(next(iter(core.tvms.values())).running) == 1
    )  # the one left holds one task, one waits


def test_shrink_taskcompletion_waits_for_running_tasks() -> None:
    core, clock = _core(2)
    _pool(core, 2)
    _job(core, tasks=2)
    core.take_effects()
    core.resize_pool(
        "p", m.PoolResize(target_dedicated=1, tvm_deallocation_option="taskcompletion")
    )
    assert _sends(core, pm.LeavePool) == []
    leaving = next(t for t in core.tvms.values() if t.rec.state == "leavingpool")
    (key, task) = next(iter(leaving.running.items()))
    core.add_task("wi", JOB, m.TaskAdd(name="later", command_line="run"))
    core.schedule()
    assert list(leaving.running) == [key]  # no new task on a leaving TVM
    core.agent_message(
        leaving.rec.agent_id,
        pm.TaskCompleted(
            key=key, attempt=task.attempt, exit_code=0, start_time=clock.now, end_time=clock.now
        ),
    )
    (leave,) = _sends(core, pm.LeavePool)
    assert leave.tvm_name == leaving.rec.name
    assert task.state == "completed"
    assert task.requeue_count == 0


def test_shrink_terminate_completes_tasks_with_failure() -> None:
    core, _ = _core(1)
    _pool(core, 1)
    _job(core, tasks=1)
    core.resize_pool("p", m.PoolResize(target_dedicated=0, tvm_deallocation_option="terminate"))
    task = core.jobs[f"wi/{JOB}"].tasks["t0"]
    assert task.state == "completed"
    assert task.failure[1] == "TaskEnded"
    assert task.exit_code == WALL_CLOCK_EXIT_CODE


def test_job_manager_tvm_is_removed_last() -> None:
    core, _ = _core(2)
    _pool(core, 2)
    _job(core)
    jm = m.TaskAdd(name="jm", command_line="run")
    core.add_task("wi", JOB, jm)
    core.jobs[f"wi/{JOB}"].tasks["jm"].job_manager = True
    core.add_task("wi", JOB, m.TaskAdd(name="other", command_line="run"))
    core.schedule()
    jm_tvm = core.jobs[f"wi/{JOB}"].tasks["jm"].tvm
    core.resize_pool("p", m.PoolResize(target_dedicated=1))
    assert core.tvms[jm_tvm].rec.state != "leavingpool"


def test_remove_tvms_and_bad_input() -> None:
    core, _ = _core(3)
    _pool(core, 2)
    core.add_pool(m.PoolAdd(name="q", target_dedicated=1))
    _ready_all(core, "q")
    mine = [t.rec.name for t in core.pool_tvms("p")]
    other = core.pool_tvms("q")[0].rec.name
    core.take_effects()
    _refused(
        core.remove_tvms,
        "p",
        m.TvmRemove(tvm_names=[mine[0], other]),
        status=400,
        code="TVMNotInPool",
    )
    _refused(core.remove_tvms, "p", m.TvmRemove(tvm_names=["nope"]), status=404, code="TVMNotFound")
    _refused(
        core.remove_tvms,
        "p",
        m.TvmRemove(tvm_names=[mine[0]], tvm_deallocation_option="later"),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core.remove_tvms, "p", m.TvmRemove(tvm_names=[]), status=400, code="MissingRequiredProperty"
    )
    assert core.take_effects().writes == []  # nothing changed
    core.remove_tvms("p", m.TvmRemove(tvm_names=[mine[0]]))
    assert core.pools["p"].target == 1
    assert core.tvms[mine[0]].rec.state == "leavingpool"
    _refused(
        core.remove_tvms, "p", m.TvmRemove(tvm_names=[mine[0]]), status=409, code="PoolBeingResized"
    )


def test_resize_bad_input_changes_nothing() -> None:
    core, _ = _core(0)
    core.add_pool(m.PoolAdd(name="p"))
    core.add_pool(
        m.PoolAdd(name="auto", enable_auto_scale=True, auto_scale_formula="$TargetDedicated = 0;")
    )
    core.take_effects()
    _refused(
        core.resize_pool,
        "p",
        m.PoolResize(target_dedicated=-1),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core.resize_pool,
        "p",
        m.PoolResize(target_dedicated=51),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core.resize_pool,
        "p",
        m.PoolResize(target_dedicated=1, tvm_deallocation_option="x"),
        status=400,
        code="InvalidPropertyValue",
    )
    _refused(
        core.resize_pool,
        "auto",
        m.PoolResize(target_dedicated=1),
        status=409,
        code="AutoScaleEnabled",
    )
    _refused(
        core.resize_pool, "zz", m.PoolResize(target_dedicated=1), status=404, code="PoolNotFound"
    )
    assert core.take_effects().writes == []
    assert core.pools["p"].target == 0


def test_deleting_pool_refuses_operations() -> None:
    core, _ = _core(1)
    _pool(core, 1)
    tvm = core.pool_tvms("p")[0]
    core.delete_pool("p")
    assert core.pools["p"].state == "deleting"  # until the agent reports it wiped the TVM
    core.take_effects()
    _refused(
        core.resize_pool, "p", m.PoolResize(target_dedicated=2), status=409, code="PoolBeingDeleted"
    )
    _refused(core.reboot_tvm, "p", tvm.rec.name, None, status=409, code="PoolBeingDeleted")
    _refused(
        core.remove_tvms,
        "p",
        m.TvmRemove(tvm_names=[tvm.rec.name]),
        status=409,
        code="PoolBeingDeleted",
    )
    assert core.take_effects().writes == []
    core.agent_message("a0", pm.TvmLeft(tvm_name=tvm.rec.name))
    assert "p" not in core.pools


def test_lost_agent_of_a_leaving_tvm_is_forgotten() -> None:
    core, clock = _core(1)
    _pool(core, 1)
    name = core.pool_tvms("p")[0].rec.name
    core.agent_disconnected("a0")
    core.resize_pool("p", m.PoolResize(target_dedicated=0))
    assert name not in core.tvms  # nobody to wait for
    _hello(core, "a0")
    core.agent_hello(pm.Hello(agent_id="a0", token="t", tvm_name=name))
    assert any(m_.tvm_name == name for m_ in _sends(core, pm.LeavePool))


# ------------------------------------------------------------------ TVM operations


def test_reboot_requeues_and_rejoins() -> None:
    core, _ = _core(1)
    _pool(core, 1, start_task=m.StartTask(command_line="setup", wait_for_success=False))
    _job(core, tasks=1)
    tvm = core.pool_tvms("p")[0]
    core.take_effects()
    core.reboot_tvm("p", tvm.rec.name, m.TvmReboot())
    assert tvm.rec.state == "rebooting"
    sends = [msg for _, msg in map(astuple, core.take_effects().sends)]
    kinds = [type(x).__name__ for x in sends]
    assert kinds.index("RebootTvm") < kinds.index("JoinPool")
    assert "CancelTask" in kinds
    assert core.jobs[f"wi/{JOB}"].tasks["t0"].state == "active"
    core.schedule()
    assert not tvm.running  # not while rebooting
    _refused(core.reboot_tvm, "p", tvm.rec.name, None, status=409, code="TVMBeingRebooted")
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    assert tvm.rec.state == "idle"


def test_reimage_taskcompletion_waits() -> None:
    core, clock = _core(1)
    _pool(core, 1)
    _job(core, tasks=1)
    tvm = core.pool_tvms("p")[0]
    core.take_effects()
    core.reimage_tvm("p", tvm.rec.name, m.TvmReimage(tvm_reimage_option="taskcompletion"))
    assert tvm.rec.state == "reimaging"
    assert _sends(core, pm.RebootTvm) == []
    task = core.jobs[f"wi/{JOB}"].tasks["t0"]
    core.agent_message(
        "a0",
        pm.TaskCompleted(
            key=f"wi/{JOB}/t0",
            attempt=task.attempt,
            exit_code=0,
            start_time=clock.now,
            end_time=clock.now,
        ),
    )
    (reboot,) = _sends(core, pm.RebootTvm)
    assert reboot.reimage


def test_disable_and_enable_scheduling() -> None:
    core, _ = _core(1)
    _pool(core, 1)
    _job(core, tasks=1)
    tvm = core.pool_tvms("p")[0]
    core.disable_scheduling("p", tvm.rec.name, m.TvmDisableScheduling())
    assert (tvm.rec.state, tvm.rec.scheduling) == ("offline", "disabled")
    core.schedule()
    assert not tvm.running
    _refused(
        core.disable_scheduling,
        "p",
        tvm.rec.name,
        None,
        status=409,
        code="TVMAlreadyInTargetSchedulingState",
    )
    core.enable_scheduling("p", tvm.rec.name)
    assert tvm.rec.state == "idle"
    core.schedule()
    assert tvm.running
    _refused(
        core.enable_scheduling,
        "p",
        tvm.rec.name,
        status=409,
        code="TVMAlreadyInTargetSchedulingState",
    )


def test_delete_tvm_requeues_and_shrinks_target() -> None:
    core, _ = _core(2)
    _pool(core, 2)
    _job(core, tasks=1)
    task = core.jobs[f"wi/{JOB}"].tasks["t0"]
    where = task.tvm
    core.delete_tvm("p", where)
    assert core.pools["p"].target == 1
    assert task.state == "active"
    assert task.requeue_count == 1
    core.schedule()
    assert task.tvm != where
    assert task.state == "running"


# ------------------------------------------------------------------ auto pools


def _auto(lifetime: str = "job", keep: bool = False, **pool: object) -> dict:
    return {
        "poolLifetimeOption": lifetime,
        "keepAlive": keep,
        "pool": {"targetDedicated": 1, **pool},
    }


def test_auto_pool_per_job_is_made_and_released() -> None:
    core, _ = _core(1)
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(
                auto_pool_specification=_auto(vmSize="medium")
            ),
        )
    )
    job = core.jobs[f"wi/{JOB}"]
    pool = core.pools[job.rec.pool]
    assert pool.auto_owner == f"wi/{JOB}"
    assert pool.spec.vm_size == "medium"
    assert len(core.pool_tvms(job.rec.pool)) == 1
    core.delete_workitem("wi")
    core.tick()
    assert core.pools[job.rec.pool].state == "deleting"


def test_auto_pool_keep_alive_stays() -> None:
    core, _ = _core(0)
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(
                auto_pool_specification=_auto("workitem", keep=True)
            ),
        )
    )
    name = core.jobs[f"wi/{JOB}"].rec.pool
    core.delete_workitem("wi")
    core.tick()
    assert core.pools[name].state == "active"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"poolLifetimeOption": "forever", "pool": {}}, "poolLifetimeOption"),
        ({"poolLifetimeOption": "job"}, "pool"),
        ({"poolLifetimeOption": "job", "pool": {"vmSize": "huge"}}, "vmSize"),
        ({"poolLifetimeOption": "job", "pool": {"bogus": 1}}, "pool"),
        ({"poolLifetimeOption": "job", "keepAlive": "yes", "pool": {}}, "keepAlive"),
        ({"poolLifetimeOption": "job", "pool": {"name": "x"}}, "pool.name"),
    ],
)
def test_auto_pool_bad_input(spec: dict, field: str) -> None:
    core, _ = _core(0)
    with pytest.raises(ApiError) as info:
        core.add_workitem(
            m.WorkitemAdd(
                name="wi",
                job_execution_environment=m.JobExecutionEnvironment(auto_pool_specification=spec),
            )
        )
    assert info.value.status == 400
    assert field in info.value.values.get("field", "")
    assert not core.pools
    assert not core.workitems


def test_agents_started_at_startup_are_not_asked_for_twice() -> None:
    core, _ = _core(0, provisioning=True)
    core.expect_agents(2)  # `tvm up --agents 2` launched them; they have not registered yet
    core.add_pool(m.PoolAdd(name="p", target_dedicated=3))
    assert core.take_effects().provision == [Provision(1, "small", "p")]
    for i in range(3):
        _hello(core, f"a{i}")
    assert len(core.tvms) == 3
    assert core.provision_pending == 0


def test_a_provisioner_failure_stops_the_resize_with_its_reason_until_the_next_resize() -> None:
    core, _ = _core(0, provisioning=True)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    assert core.take_effects().provision == [Provision(2, "small", "p")]
    core.provision_failed("p", "HostUnreachable", "host root@h:22 cannot be reached")
    pool = core.pools["p"]
    assert pool.alloc_state == "steady"
    assert pool.resize_error == ("HostUnreachable", "host root@h:22 cannot be reached")
    assert any(w.kind == "pool" and w.key == "p" for w in core.take_effects().writes)
    _hello(core, "late")  # a free agent does not join a pool whose resize failed
    assert not core.tvms
    core.provision_failed("nope", "X", "no such pool: ignored")
    core.resize_pool("p", m.PoolResize(target_dedicated=1))
    assert core.pools["p"].resize_error is None
    assert len(core.tvms) == 1


def test_named_provisioners_keep_their_agents_for_the_pools_naming_them() -> None:
    core, _ = _core(0, provisioning=True)
    core.store.provisioner_names = frozenset({"lab"})
    lab = [m.MetadataItem(name="provisioner", value="lab")]
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, metadata=lab))
    core.add_pool(m.PoolAdd(name="q", target_dedicated=1))
    core.add_pool(
        m.PoolAdd(
            name="r",
            target_dedicated=1,
            metadata=[m.MetadataItem(name="provisioner", value="nope")],
        )
    )
    _hello(core, "a0")  # a plain agent: not for p (nor r), for q
    assert [t.rec.pool for t in core.tvms.values()] == ["q"]
    _hello(core, "lab-0-ab")  # the lab provisioner's agent: for p only
    _hello(core, "lab-1-cd")  # nobody else may take it: it stays free
    assert sorted((t.rec.pool, t.rec.agent_id) for t in core.tvms.values()) == [
        ("p", "lab-0-ab"),
        ("q", "a0"),
    ]
    assert core.agents["lab-1-cd"].tvm is None
    # without named provisioners any free agent joins any pool, as before
    core.store.provisioner_names = frozenset()
    core.resize_pool("q", m.PoolResize(target_dedicated=2))
    assert core.agents["lab-1-cd"].tvm is not None
