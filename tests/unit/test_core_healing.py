"""TVM healing in the pure core: a lost agent's TVM goes `unknown` (tasks requeued) after the link
grace or at once when its process is seen to exit, leaves its pool after the pool's timeout and is
replaced; a TVM on which tasks keep failing (and succeed elsewhere) is `unusable` with a reason;
what the agent reports in heartbeats (broken host state, degraded modes, disk) reaches the record.
Fake clock, no sockets."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState, Provision
from coordinator.core.records import TaskRec, Tvm
from protocol import messages as pm

JOB = "job-0000000001"
GIB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(n: int = 2, unknown_timeout: str | None = None) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=30.0)
    for i in range(n):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t", disk_bytes=10 * GIB))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=n, unknown_tvm_timeout=unknown_timeout))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(
            name="wi",
            job_execution_environment=m.JobExecutionEnvironment(pool_name="p"),
            job_constraints=m.JobConstraints(max_task_retry_count=5),
        )
    )
    core.take_effects()
    return core, clock


def _tvm_of(core: CoordinatorState, agent: str) -> Tvm:
    return next(t for t in core.tvms.values() if t.rec.agent_id == agent)


def _run_one(core: CoordinatorState, name: str = "t") -> tuple[str, pm.TaskSpec]:
    core.add_task("wi", JOB, m.TaskAdd(name=name, command_line="run"))
    core.schedule()
    (send,) = [s for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
    assert isinstance(send.msg, pm.RunTask)
    return send.agent_id, send.msg.spec


def _task(core: CoordinatorState, name: str = "t") -> TaskRec:
    return core.get_task("wi", JOB, name)[1]


def _beat_all_but(core: CoordinatorState, agent: str) -> None:
    for a in core.agents.values():
        if a.agent_id != agent and a.connected:
            core.agent_message(a.agent_id, pm.Heartbeat())


def test_a_closed_link_loses_its_tvm_after_the_grace_not_the_heartbeat_timeout() -> None:
    core, clock = _core()
    core.link_grace = 3.0
    agent, _ = _run_one(core)
    tvm = _tvm_of(core, agent)
    core.agent_disconnected(agent)
    clock.now += 2.0
    _beat_all_but(core, agent)
    core.tick()
    assert tvm.rec.state == "running"
    assert _task(core).state == "running"
    clock.now += 1.5
    _beat_all_but(core, agent)
    core.tick()
    assert tvm.rec.state == "unknown"
    assert tvm.rec.state_reason.startswith("AgentLinkLost: ")
    task = _task(core)
    assert (task.state, task.requeue_count, task.retry_count) == ("active", 1, 0)


def test_a_link_back_within_the_grace_keeps_its_tasks() -> None:
    core, clock = _core()
    core.link_grace = 3.0
    agent, spec = _run_one(core)
    core.agent_disconnected(agent)
    clock.now += 2.0
    core.agent_hello(
        pm.Hello(
            agent_id=agent,
            token="t",
            session_id="s",
            tvm_name=_tvm_of(core, agent).rec.name,
            running=[pm.RunningTask(key=spec.key, attempt=spec.attempt)],
        )
    )
    clock.now += 5.0
    core.tick()
    assert _tvm_of(core, agent).rec.state == "running"
    assert _task(core).requeue_count == 0


def test_after_a_restart_agents_get_the_whole_heartbeat_timeout() -> None:
    core, clock = _core()
    core.link_grace = 3.0
    core.recovering_until = clock.now + 30.0  # as Store.restore leaves it
    for a in core.agents.values():
        a.connected = False
        a.disconnected_at = clock.now
    clock.now += 10.0
    core.tick()
    assert {t.rec.state for t in core.tvms.values()} == {"idle"}


def test_a_silent_agent_is_lost_after_the_heartbeat_timeout_with_that_reason() -> None:
    core, clock = _core()
    agent, _ = _run_one(core)
    clock.now += 31.0
    _beat_all_but(core, agent)
    core.tick()
    core.tick()
    tvm = _tvm_of(core, agent)
    assert tvm.rec.state == "unknown"
    assert tvm.rec.state_reason.startswith("HeartbeatTimeout: ")
    assert _task(core).state == "active"


def test_an_exited_agent_process_loses_its_tvm_at_once() -> None:
    core, _ = _core()
    agent, _ = _run_one(core)
    tvm = _tvm_of(core, agent)
    core.agent_exited(agent, "its process 123 was killed by signal 9")
    assert tvm.rec.state == "unknown"
    assert tvm.rec.state_reason == "AgentExited: its process 123 was killed by signal 9"
    assert _task(core).state == "active"
    assert _task(core).requeue_count == 1
    assert agent not in core.agents  # a new process enrols as a new agent
    core.schedule()
    (send,) = [s for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
    assert send.agent_id != agent  # the task runs elsewhere
    core.agent_exited(agent, "again")  # a second report changes nothing
    core.agent_exited("never-seen", "gone")


def test_an_unknown_tvm_leaves_its_pool_after_the_pool_timeout_and_is_replaced() -> None:
    core, clock = _core(unknown_timeout="PT20S")
    core.provisioning_enabled = True
    agent = "a0"
    tvm = _tvm_of(core, agent)
    core.agent_exited(agent, "gone")
    core.take_effects()
    clock.now += 19.0
    _beat_all_but(core, agent)
    core.tick()
    assert tvm.rec.name in core.tvms
    assert not core.take_effects().provision
    clock.now += 1.5
    _beat_all_but(core, agent)
    core.tick()
    assert tvm.rec.name not in core.tvms
    fx = core.take_effects()
    assert fx.provision == [Provision(count=1, vm_size="small", pool="p")]
    assert any(w.kind == "tvm" and w.key == tvm.rec.name and w.body is None for w in fx.writes)
    # A free agent joins in its place.
    core.agent_hello(pm.Hello(agent_id="a9", token="t"))
    assert _tvm_of(core, "a9").rec.pool == "p"
    assert len(core.pool_tvms("p")) == 2


def test_the_coordinator_default_applies_without_a_pool_setting() -> None:
    core, clock = _core()
    core.unknown_tvm_timeout = 50.0
    tvm = _tvm_of(core, "a0")
    core.agent_exited("a0", "gone")
    clock.now += 49.0
    _beat_all_but(core, "a0")
    core.tick()
    assert tvm.rec.name in core.tvms
    clock.now += 2.0
    _beat_all_but(core, "a0")
    core.tick()
    assert tvm.rec.name not in core.tvms


@pytest.mark.parametrize("bad", ["soon", "PT0S", "P30D", ""])
def test_a_bad_pool_timeout_is_refused_and_creates_nothing(bad: str) -> None:
    core, _ = _core()
    with pytest.raises(ApiError) as err:
        core.add_pool(m.PoolAdd(name="q", target_dedicated=1, unknown_tvm_timeout=bad))
    assert err.value.status == 400
    assert "unknownTvmTimeout" in err.value.message
    assert "q" not in core.pools
    assert not core.take_effects().writes


def _finish(core: CoordinatorState, agent: str, spec: pm.TaskSpec, code: int) -> None:
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt, exit_code=code, start_time=1.0, end_time=2.0
        ),
    )


def test_a_tvm_whose_tasks_fail_and_then_succeed_elsewhere_becomes_unusable() -> None:
    core, _ = _core()
    core.unusable_after_failures = 3
    bad, good = _tvm_of(core, "a0"), _tvm_of(core, "a1")
    heal = core.healing
    for i in range(3):
        heal.task_result(f"wi/j/t{i}", bad.rec.name, False)
    heal.task_result("wi/j/t0", bad.rec.name, False)  # a retry there again: still 3 tasks
    heal.task_result("wi/j/t0", good.rec.name, True)
    heal.task_result("wi/j/t1", good.rec.name, True)
    assert bad.rec.state == "idle"  # two confirmed so far
    heal.task_result("wi/j/t2", good.rec.name, True)
    assert bad.rec.state == "unusable"
    assert bad.rec.state_reason == (
        "TaskFailures: 3 tasks in a row failed on this TVM and 3 of them then succeeded on another"
    )
    assert good.rec.state == "idle"
    # Heartbeats without a disk or host problem do not undo it, and it gets no new work.
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=GIB))
    assert bad.rec.state == "unusable"
    agent, _ = _run_one(core, "later")
    assert agent == "a1"
    # The operator reboots it: it serves again and its old failures do not count any more.
    core.reboot_tvm("p", bad.rec.name)
    core.agent_message("a0", pm.TvmReady(tvm_name=bad.rec.name))
    assert bad.rec.state == "idle"
    assert bad.rec.name not in heal.streaks
    assert bad.rec.name not in heal.confirmed


def test_completions_reach_the_streaks_through_the_core() -> None:
    core, _ = _core()
    agent, spec = _run_one(core)
    _finish(core, agent, spec, 3)
    tvm = _tvm_of(core, agent)
    assert core.healing.streaks[tvm.rec.name] == [spec.key]
    core.schedule()
    (send,) = [s for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
    assert isinstance(send.msg, pm.RunTask)
    _finish(core, send.agent_id, send.msg.spec, 0)
    where = _tvm_of(core, send.agent_id).rec.name
    if where != tvm.rec.name:  # the retry ran elsewhere: the failure is confirmed
        assert core.healing.confirmed[tvm.rec.name] == {spec.key}
    else:  # it ran on the same TVM and succeeded: the streak is over
        assert tvm.rec.name not in core.healing.streaks


def test_tasks_that_fail_everywhere_say_nothing_about_the_tvm() -> None:
    core, _ = _core()
    for i in range(6):
        core.add_task("wi", JOB, m.TaskAdd(name=f"t{i}", command_line="run"))
    for _ in range(100):
        core.schedule()
        sends = [s for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
        if not sends:
            break
        for s in sends:
            assert isinstance(s.msg, pm.RunTask)
            _finish(core, s.agent_id, s.msg.spec, 1)
    assert {t.rec.state for t in core.tvms.values()} == {"idle"}
    assert all(_task(core, f"t{i}").retry_count == 5 for i in range(6))


def test_a_success_on_the_tvm_ends_its_streak() -> None:
    core, _ = _core()
    core.unusable_after_failures = 2
    tvm = _tvm_of(core, "a0")
    heal = core.healing
    heal.task_result("wi/j/x", tvm.rec.name, False)
    heal.task_result("wi/j/y", tvm.rec.name, True)  # the TVM can run tasks after all
    heal.task_result("wi/j/z", tvm.rec.name, False)
    heal.task_result("wi/j/x", "elsewhere", True)
    heal.task_result("wi/j/z", "elsewhere", True)
    assert tvm.rec.state == "idle"
    assert not heal.streaks.get("elsewhere")


def test_host_state_the_agent_cannot_repair_makes_the_tvm_unusable_until_fixed() -> None:
    core, _ = _core()
    tvm = _tvm_of(core, "a0")
    core.agent_message("a0", pm.Heartbeat(unusable="task user tvmslot0: group cannot be made"))
    assert tvm.rec.state == "unusable"
    assert tvm.rec.state_reason == "HostStateBroken: task user tvmslot0: group cannot be made"
    core.agent_message("a0", pm.Heartbeat())
    assert tvm.rec.state == "idle"
    assert tvm.rec.state_reason == ""


def test_an_agent_broken_before_its_tvm_is_ready_is_unusable_and_starts_again() -> None:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    tvm = _tvm_of(core, "a0")
    assert tvm.rec.state == "starting"
    core.agent_message("a0", pm.Heartbeat(unusable="cgroup: cannot create"))
    assert tvm.rec.state == "unusable"
    core.agent_message("a0", pm.Heartbeat())
    assert tvm.rec.state == "starting"


def test_degraded_modes_of_heartbeats_and_a_nearly_full_disk_reach_the_record() -> None:
    core, _ = _core()
    tvm = _tvm_of(core, "a0")
    core.agents["a0"].degraded = ["no-cgroups: none writable"]
    core.agent_message("a0", pm.Heartbeat(degraded=["ports-unfenced: nft failed"]))
    assert core.tvm_degraded(tvm) == ["no-cgroups: none writable", "ports-unfenced: nft failed"]
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=10 * GIB - 400 * 1024 * 1024))
    modes = core.tvm_degraded(tvm)
    assert modes[-1].startswith("disk-nearly-full: 400 MiB free")
    assert tvm.rec.state == "idle"  # nearly full, not yet full
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=10 * GIB - 100 * 1024 * 1024))
    assert tvm.rec.state == "unusable"
    assert tvm.rec.state_reason.startswith("DiskFull: ")
    core.agent_message("a0", pm.Heartbeat(disk_used_bytes=GIB, degraded=[]))
    assert tvm.rec.state == "idle"
    assert core.tvm_degraded(tvm) == ["no-cgroups: none writable"]
