"""Issue 9 §3, pure core: an agent that restarts loses its running tasks (requeued, TVM joined again);
one that drains hands tasks back with AGENT_STOPPING (requeued, no retry used); a reconnect of the
same agent process changes nothing."""

from __future__ import annotations

from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from protocol import messages as pm


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


JOB = "job-0000000001"


def _core() -> tuple[CoordinatorState, str, str]:
    """One agent backing one ready TVM of pool p (2 slots), one workitem with its job."""
    core = CoordinatorState("acct", clock=Clock(), heartbeat_timeout=10.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, max_tasks_per_vm=2))
    (tvm,) = core.tvms.values()
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.take_effects()
    return core, "a0", tvm.rec.name


def _place(core: CoordinatorState, *names: str) -> list[pm.TaskSpec]:
    for n in names:
        core.add_task("wi", JOB, m.TaskAdd(name=n, command_line="run"))
    core.schedule()
    return [
        msg.spec
        for _, msg in map(astuple, core.take_effects().sends)
        if isinstance(msg, pm.RunTask)
    ]


def test_fresh_agent_process_requeues_what_ran_and_rejoins_the_same_tvm():
    core, agent, tvm_name = _core()
    specs = _place(core, "t1", "t2")
    assert len(specs) == 2
    core.agent_disconnected(agent)
    # The restarted process says hello with nothing: no session, no TVM, no running tasks.
    core.agent_hello(pm.Hello(agent_id=agent, token="t"))
    sends = core.take_effects().sends
    for name in ("t1", "t2"):
        _, t = core.get_task("wi", JOB, name)
        assert (t.state, t.requeue_count, t.retry_count, t.tvm) == ("active", 1, 0, None)
    tvm = core.tvms[tvm_name]
    assert tvm.running == {}
    assert tvm.rec.state == "starting"
    assert not tvm.ready
    assert any(
        isinstance(msg, pm.JoinPool) and msg.tvm_name == tvm_name for _, msg in map(astuple, sends)
    )
    # Nothing is placed on the TVM before it is ready again...
    assert core.schedule() == 0
    # ...then both run again, as new attempts.
    core.agent_message(agent, pm.TvmReady(tvm_name=tvm_name))
    again = _place(core)
    assert {s.task for s in again} == {"t1", "t2"}
    assert {s.attempt for s in again}.isdisjoint({s.attempt for s in specs})


def test_reconnect_of_the_same_process_keeps_running_tasks():
    core, agent, tvm_name = _core()
    (spec,) = _place(core, "t1")
    core.agent_disconnected(agent)
    core.agent_hello(
        pm.Hello(
            agent_id=agent,
            token="t",
            session_id="s1",
            tvm_name=tvm_name,
            running=[pm.RunningTask(key=spec.key, attempt=spec.attempt)],
        )
    )
    sends = core.take_effects().sends
    _, t = core.get_task("wi", JOB, "t1")
    assert (t.state, t.attempt, t.requeue_count) == ("running", spec.attempt, 0)
    assert not any(isinstance(msg, (pm.JoinPool, pm.CancelTask)) for _, msg in map(astuple, sends))
    # A resumed session with a RunTask still in flight (not yet reported) is not "lost" either.
    (spec2,) = _place(core, "t2")
    core.agent_hello(
        pm.Hello(
            agent_id=agent,
            token="t",
            session_id="s1",
            tvm_name=tvm_name,
            running=[pm.RunningTask(key=spec.key, attempt=spec.attempt)],
        ),
        {spec2.key},
    )
    assert core.get_task("wi", JOB, "t2")[1].state == "running"
    assert core.tvms[tvm_name].rec.state == "running"


def test_fresh_agent_without_a_tvm_is_just_free():
    core = CoordinatorState("acct", clock=Clock(), heartbeat_timeout=10.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.agent_disconnected("a0")
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    assert core.agents["a0"].connected
    assert core.agents["a0"].tvm is None
    assert core.take_effects().sends == []


def test_draining_agent_hands_tasks_back_without_using_a_retry():
    core, agent, tvm_name = _core()
    specs = _place(core, "t1", "t2")
    core.agent_message(agent, pm.Draining(reason="agent stopping"))
    assert core.tvms[tvm_name].rec.state == "offline"
    for spec in specs:
        core.agent_message(
            agent,
            pm.TaskCompleted(
                key=spec.key,
                attempt=spec.attempt,
                exit_code=-1,
                start_time=1.0,
                end_time=2.0,
                failure=pm.Failure(
                    category="ServerError", code=pm.AGENT_STOPPING, message="stopping"
                ),
            ),
        )
    for name in ("t1", "t2"):
        _, t = core.get_task("wi", JOB, name)
        assert (t.state, t.requeue_count, t.retry_count, t.failure) == ("active", 1, 0, None)
    assert core.tvms[tvm_name].running == {}
    # The offline TVM takes nothing new.
    assert core.schedule() == 0
    # A resent AGENT_STOPPING for the same attempt changes nothing (exactly once).
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=specs[0].key,
            attempt=specs[0].attempt,
            exit_code=-1,
            start_time=1.0,
            end_time=2.0,
            failure=pm.Failure(category="ServerError", code=pm.AGENT_STOPPING),
        ),
    )
    assert core.get_task("wi", JOB, "t1")[1].requeue_count == 1


def test_other_failures_still_complete_the_task():
    core, agent, _ = _core()
    (spec,) = _place(core, "t1")
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=-1,
            start_time=1.0,
            end_time=2.0,
            failure=pm.Failure(category="UserError", code="TaskEnded", message="killed"),
        ),
    )
    _, t = core.get_task("wi", JOB, "t1")
    assert (t.state, t.requeue_count) == ("completed", 0)
