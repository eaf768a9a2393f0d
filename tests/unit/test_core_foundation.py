"""Issue 3, pure core: resources, agent registration, TVM readiness, placement effects, completion
exactly once, journal writes and restore, and refused requests that leave nothing behind.

No sockets, no Trio: the core is driven with commands and agent events under a fake clock."""

from __future__ import annotations

import msgspec
import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState, Effects
from coordinator.core.records import TaskDone, TaskRec
from protocol import messages as pm

JOB = "job-0000000001"


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


class Journal:
    """What the SQLite journal would hold after applying every effect's writes, in order."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], bytes] = {}

    def apply(self, fx: Effects) -> Effects:
        for w in fx.writes:
            if w.body is not None:
                self.rows[(w.kind, w.key)] = w.body
            elif w.prefix:
                for k in [k for k in self.rows if k[0] == w.kind and k[1].startswith(w.key)]:
                    del self.rows[k]
            else:
                self.rows.pop((w.kind, w.key), None)
        return fx

    def load(self) -> list[tuple[str, str, bytes]]:
        order = ["pool", "tvm", "workitem", "job", "task"]
        return sorted(
            ((k, key, b) for (k, key), b in self.rows.items()),
            key=lambda r: (order.index(r[0]) if r[0] in order else 99, r[1]),
        )


def _core(clock: Clock | None = None) -> tuple[CoordinatorState, Clock, Journal]:
    clock = clock or Clock()
    return CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0), clock, Journal()


def _hello(core: CoordinatorState, agent: str, **kw: object) -> None:
    core.agent_hello(
        pm.Hello(agent_id=agent, token="t", ip_address="10.0.0.1", hostname=agent, **kw)
    )


def _wi(name: str = "wi", pool: str = "p", priority: int = 0) -> m.WorkitemAdd:
    return m.WorkitemAdd(
        name=name,
        job_execution_environment=m.JobExecutionEnvironment(pool_name=pool),
        priority=priority,
    )


def _ready_cluster(n_agents: int = 2, slots: int = 1) -> tuple[CoordinatorState, Clock, Journal]:
    core, clock, j = _core()
    for i in range(n_agents):
        _hello(core, f"a{i}")
    core.add_pool(
        m.PoolAdd(name="p", target_dedicated=n_agents, max_tasks_per_vm=slots, vm_size="large")
    )
    for tvm in list(core.tvms.values()):
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(_wi())
    j.apply(core.take_effects())
    return core, clock, j


def _runs(fx: Effects) -> list[tuple[str, pm.TaskSpec]]:
    return [
        (agent, msg.spec) for agent, msg in map(astuple, fx.sends) if isinstance(msg, pm.RunTask)
    ]


def _done(core: CoordinatorState, agent: str, spec: pm.TaskSpec, code: int = 0) -> None:
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=code,
            start_time=core.clock() - 1,
            end_time=core.clock(),
        ),
    )


# ---------------------------------------------------------------------------- resources


def test_add_pool_workitem_tasks_and_their_writes():
    core, _, j = _core()
    core.add_pool(m.PoolAdd(name="p", target_dedicated=0))
    fx = j.apply(core.take_effects())
    assert [(w.kind, w.key) for w in fx.writes] == [("pool", "p")]
    core.add_workitem(_wi())
    fx = j.apply(core.take_effects())
    assert {(w.kind, w.key) for w in fx.writes} == {("workitem", "wi"), ("job", f"wi/{JOB}")}
    assert core.get_job("wi", JOB).rec.pool == "p"
    core.add_task("wi", JOB, m.TaskAdd(name="t1", command_line="echo 1"))
    results = core.add_tasks(
        "wi", JOB, [m.TaskAdd(name=f"c{i}", command_line="echo") for i in range(3)]
    )
    assert [r.status for r in results] == ["success"] * 3
    fx = j.apply(core.take_effects())
    assert sorted(w.key for w in fx.writes) == [
        f"wi/{JOB}/c0",
        f"wi/{JOB}/c1",
        f"wi/{JOB}/c2",
        f"wi/{JOB}/t1",
    ]
    assert fx.sends == []  # no TVMs: nothing placed
    assert core.task_counts(core.get_job("wi", JOB)).active == 4


def test_second_workitem_job_numbering_and_lookup_errors():
    core, _, _ = _core()
    core.add_workitem(_wi("a"))
    assert core.workitems["a"].recent_job == JOB
    with pytest.raises(ApiError) as e:
        core.get_job("a", "job-0000000002")
    assert (e.value.status, e.value.code) == (404, "JobNotFound")
    for call, code in [
        (lambda: core.get_pool("nope"), "PoolNotFound"),
        (lambda: core.get_workitem("nope"), "WorkItemNotFound"),
        (lambda: core.get_job("nope", JOB), "WorkItemNotFound"),
        (lambda: core.get_task("a", JOB, "nope"), "TaskNotFound"),
    ]:
        with pytest.raises(ApiError) as e:
            call()
        assert (e.value.status, e.value.code) == (404, code)
        assert e.value.values["name"] == "nope"


# ---------------------------------------------------------------------------- refused requests


def _refused(core: CoordinatorState, fn, status: int, code: str) -> ApiError:
    before = (
        set(core.pools),
        set(core.workitems),
        set(core.jobs),
        {k: set(jb.tasks) for k, jb in core.jobs.items()},
    )
    core.take_effects()
    with pytest.raises(ApiError) as e:
        fn()
    assert (e.value.status, e.value.code) == (status, code), e.value
    fx = core.take_effects()
    assert fx.writes == []
    assert fx.sends == []
    after = (
        set(core.pools),
        set(core.workitems),
        set(core.jobs),
        {k: set(jb.tasks) for k, jb in core.jobs.items()},
    )
    assert after == before
    return e.value


def test_refused_requests_leave_nothing():
    core, _, _ = _core()
    core.add_pool(m.PoolAdd(name="Pool1"))
    core.add_workitem(_wi("wi", "Pool1"))
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    _refused(
        core, lambda: core.add_pool(m.PoolAdd(name="pool1")), 409, "PoolExists"
    )  # case-insensitive
    _refused(core, lambda: core.add_pool(m.PoolAdd(name="")), 400, "MissingRequiredProperty")
    _refused(core, lambda: core.add_pool(m.PoolAdd(name="x" * 65)), 400, "InvalidPropertyValue")
    _refused(core, lambda: core.add_pool(m.PoolAdd(name="a.b")), 400, "InvalidPropertyValue")
    _refused(core, lambda: core.add_pool(m.PoolAdd(name="q", vm_size="huge")), 400, "InvalidVmSize")
    _refused(
        core,
        lambda: core.add_pool(m.PoolAdd(name="q", max_tasks_per_vm=0)),
        400,
        "InvalidPropertyValue",
    )
    _refused(core, lambda: core.add_workitem(_wi("WI", "Pool1")), 409, "WorkItemExists")
    _refused(core, lambda: core.add_workitem(_wi("w2", "bad pool")), 400, "InvalidPropertyValue")
    _refused(
        core,
        lambda: core.add_workitem(_wi("w2", "Pool1", priority=1001)),
        400,
        "InvalidPropertyValue",
    )
    _refused(
        core,
        lambda: core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x")),
        409,
        "TaskExists",
    )
    _refused(
        core,
        lambda: core.add_task("wi", JOB, m.TaskAdd(name="u", command_line="  ")),
        400,
        "MissingRequiredProperty",
    )
    err = _refused(
        core,
        lambda: core.add_task(
            "wi",
            JOB,
            m.TaskAdd(
                name="u",
                command_line="x",
                environment_settings=[m.EnvironmentSetting(name="WATASK_TASK_NAME", value="z")],
            ),
        ),
        400,
        "ReservedEnvironmentVariable",
    )
    assert err.values["name"] == "WATASK_TASK_NAME"
    _refused(
        core,
        lambda: core.add_task("wi", "job-0000000009", m.TaskAdd(name="u", command_line="x")),
        404,
        "JobNotFound",
    )
    _refused(
        core,
        lambda: core.add_task("nope", JOB, m.TaskAdd(name="u", command_line="x")),
        404,
        "WorkItemNotFound",
    )
    many = [m.TaskAdd(name=f"m{i}", command_line="x") for i in range(101)]
    _refused(core, lambda: core.add_tasks("wi", JOB, many), 400, "TooManyTasks")
    _refused(core, lambda: core.delete_pool("nope"), 404, "PoolNotFound")
    _refused(core, lambda: core.delete_workitem("nope"), 404, "WorkItemNotFound")
    _refused(core, lambda: core.delete_task("wi", JOB, "nope"), 404, "TaskNotFound")


def test_collection_reports_per_task_errors_and_stores_the_good_ones():
    core, _, j = _core()
    core.add_workitem(_wi())
    core.take_effects()
    results = core.add_tasks(
        "wi",
        JOB,
        [
            m.TaskAdd(name="ok1", command_line="x"),
            m.TaskAdd(name="bad name", command_line="x"),
            m.TaskAdd(name="ok1", command_line="x"),  # duplicate within the collection
            m.TaskAdd(
                name="env",
                command_line="x",
                environment_settings=[m.EnvironmentSetting(name="WATASK_JOB_NAME", value="z")],
            ),
            m.TaskAdd(name="ok2", command_line="x"),
        ],
    )
    assert [(r.name, r.status) for r in results] == [
        ("ok1", "success"),
        ("bad name", "clienterror"),
        ("ok1", "clienterror"),
        ("env", "clienterror"),
        ("ok2", "success"),
    ]
    assert results[2].error["code"] == "TaskExists"
    assert results[3].error["code"] == "ReservedEnvironmentVariable"
    fx = j.apply(core.take_effects())
    assert sorted(w.key for w in fx.writes) == [f"wi/{JOB}/ok1", f"wi/{JOB}/ok2"]
    assert set(core.get_job("wi", JOB).tasks) == {"ok1", "ok2"}


# ---------------------------------------------------------------------------- agents and TVMs


def test_agent_hello_joins_pool_and_tvm_ready_makes_it_idle():
    core, _, _ = _core()
    _hello(core, "a0", cores=4, memory_bytes=8 << 30)
    assert core.agents["a0"].connected
    assert core.agents["a0"].tvm is None  # free inventory
    assert core.take_effects().sends == []
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, max_tasks_per_vm=2, vm_size="medium"))
    fx = core.take_effects()
    joins = [(a, msg) for a, msg in map(astuple, fx.sends) if isinstance(msg, pm.JoinPool)]
    assert len(joins) == 1
    agent, join = joins[0]
    assert agent == "a0"
    assert (join.pool, join.account, join.slots) == ("p", "acct", 2)
    tvm = core.tvms[join.tvm_name]
    assert tvm.rec.agent_id == "a0"
    assert tvm.rec.ip == "10.0.0.1"
    assert tvm.rec.state == "starting"
    assert ("tvm", join.tvm_name) in {(w.kind, w.key) for w in fx.writes}
    # Not placeable before TvmReady.
    core.add_workitem(_wi())
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    assert core.schedule() == 0
    core.agent_message("a0", pm.TvmReady(tvm_name=join.tvm_name))
    assert tvm.rec.state == "idle"
    assert core.schedule() == 1
    assert tvm.rec.state == "running"


def test_second_agent_stays_free_until_a_pool_needs_it():
    core, _, _ = _core()
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    assert core.pools["p"].alloc_state == "resizing"
    _hello(core, "a0")
    _hello(core, "a1")
    assert sum(1 for a in core.agents.values() if a.tvm) == 1
    assert core.pools["p"].alloc_state == "steady"


def test_tvm_ready_for_another_tvm_name_is_ignored():
    core, _, _ = _core()
    _hello(core, "a0")
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    core.agent_message("a0", pm.TvmReady(tvm_name="tvm-someone-else"))
    assert next(iter(core.tvms.values())).rec.state == "starting"


# ---------------------------------------------------------------------------- tasks run and complete


def test_schedule_sends_run_task_with_spec():
    core, _, _ = _ready_cluster(n_agents=2, slots=1)
    core.add_task(
        "wi",
        JOB,
        m.TaskAdd(
            name="t",
            command_line="echo hi",
            environment_settings=[m.EnvironmentSetting(name="X", value="1")],
        ),
    )
    core.take_effects()
    assert core.schedule() == 1
    runs = _runs(core.take_effects())
    assert len(runs) == 1
    agent, spec = runs[0]
    _, task = core.get_task("wi", JOB, "t")
    assert task.state == "running"
    assert core.tvms[task.tvm].rec.agent_id == agent
    assert (spec.key, spec.workitem, spec.job, spec.task) == (f"wi/{JOB}/t", "wi", JOB, "t")
    assert spec.command_line == "echo hi"
    assert spec.env == {"X": "1"}
    assert spec.attempt == task.attempt


def test_task_completed_is_recorded_once_and_journaled():
    core, clock, j = _ready_cluster()
    core.add_task("wi", JOB, m.TaskAdd(name="t", command_line="x"))
    core.schedule()
    ((agent, spec),) = _runs(j.apply(core.take_effects()))
    clock.now += 5
    _done(core, agent, spec, code=3)
    fx = j.apply(core.take_effects())
    # A completion is journaled as a small delta row, not the whole task again.
    assert [(w.kind, w.key) for w in fx.writes if w.kind.startswith("task")] == [
        ("taskdone", f"wi/{JOB}/t")
    ]
    rec = msgspec.msgpack.decode(j.rows[("task", f"wi/{JOB}/t")], type=TaskRec)
    assert rec.state == "active"
    msgspec.msgpack.decode(j.rows[("taskdone", f"wi/{JOB}/t")], type=TaskDone).apply(rec)
    assert (rec.state, rec.exit_code, rec.end_time) == ("completed", 3, clock.now)
    _, task = core.get_task("wi", JOB, "t")
    assert task.state == "completed"
    tvm = next(iter(core.tvms.values()))
    assert tvm.rec.state == "idle"
    counts = core.task_counts(core.get_job("wi", JOB))
    assert (counts.completed, counts.failed, counts.succeeded) == (1, 1, 0)
    # The same completion again (resend after a reconnect), or a stale attempt: ignored, no writes.
    clock.now += 5
    _done(core, agent, spec, code=0)
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt + 7, exit_code=0, start_time=0, end_time=0
        ),
    )
    assert [w for w in core.take_effects().writes if w.kind.startswith("task")] == []
    assert task.exit_code == 3
    assert task.end_time == clock.now - 5


def test_completion_of_unknown_task_or_from_unknown_agent_is_harmless():
    core, _, _ = _ready_cluster()
    core.agent_message(
        "a0",
        pm.TaskCompleted(
            key="wi/job-0000000001/ghost", attempt=1, exit_code=0, start_time=0, end_time=0
        ),
    )
    core.agent_message(
        "stranger", pm.TaskCompleted(key="x/y/z", attempt=1, exit_code=0, start_time=0, end_time=0)
    )
    assert [w for w in core.take_effects().writes if w.kind.startswith("task")] == []


def test_restore_from_journal_gives_the_same_tasks():
    core, clock, j = _ready_cluster(n_agents=2, slots=2)
    core.add_pool(m.PoolAdd(name="other"))
    core.add_workitem(_wi("w2", "other", priority=7))
    core.add_tasks(
        "wi",
        JOB,
        [
            m.TaskAdd(
                name=f"t{i}",
                command_line=f"echo {i}",
                environment_settings=[m.EnvironmentSetting(name="N", value=str(i))],
            )
            for i in range(10)
        ],
    )
    core.add_task("w2", JOB, m.TaskAdd(name="lonely", command_line="x"))
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    assert len(runs) == 4
    for agent, spec in runs[:3]:
        _done(core, agent, spec, code=int(spec.task[1:]))
    core.delete_task("wi", JOB, "t9")
    j.apply(core.take_effects())

    fresh = CoordinatorState("acct", epoch=2, clock=clock, heartbeat_timeout=10.0)
    fresh.restore(j.load())
    assert set(fresh.pools) == {"p", "other"}
    assert set(fresh.workitems) == {"wi", "w2"}
    assert set(fresh.tvms) == set(core.tvms)
    for key, job in core.jobs.items():
        twin = fresh.jobs[key]
        assert twin.rec == job.rec
        assert set(twin.tasks) == set(job.tasks)
        for name, t in job.tasks.items():
            r = twin.tasks[name]
            assert (r.command_line, r.env, r.seq, r.exit_code, r.end_time) == (
                t.command_line,
                t.env,
                t.seq,
                t.exit_code,
                t.end_time,
            )
            # A running task comes back active: placements are not journaled.
            assert r.state == ("active" if t.state == "running" else t.state)
        # Queue order is submission order.
        assert [t.seq for t in twin.queue] == sorted(t.seq for t in twin.queue)
        assert {t.name for t in twin.queue} == {
            n for n, t in job.tasks.items() if t.state != "completed"
        }
    assert "t9" not in fresh.jobs[f"wi/{JOB}"].tasks
    # New tasks get submission numbers after the restored ones.
    fresh.add_task("wi", JOB, m.TaskAdd(name="new", command_line="x"))
    assert fresh.jobs[f"wi/{JOB}"].tasks["new"].seq > max(
        t.seq for t in core.jobs[f"wi/{JOB}"].tasks.values()
    )


def test_restore_after_workitem_delete_drops_its_tasks():
    core, _, j = _ready_cluster()
    core.add_tasks("wi", JOB, [m.TaskAdd(name=f"t{i}", command_line="x") for i in range(5)])
    j.apply(core.take_effects())
    core.delete_workitem("wi")
    j.apply(core.take_effects())
    assert not any(kind in ("task", "job", "workitem") for kind, _ in j.rows)
    fresh = CoordinatorState("acct", epoch=2)
    fresh.restore(j.load())
    assert fresh.workitems == {}
    assert fresh.jobs == {}
