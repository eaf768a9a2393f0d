"""Pure core: slots per task and output file results survive a restart; a multi-instance task's
gang — coordination commands first, the application command once they all started, every instance
stopped when it ends, a failed instance failing it, a lost TVM requeueing it whole."""

from __future__ import annotations

from msgspec.structs import astuple

from coordinator.common import models as m
from protocol import messages as pm
from tests.unit.test_core_foundation import JOB, _core, _done, _hello, _ready_cluster, _runs, _wi


def _cancels(fx) -> list[tuple[str, str]]:
    return [
        (agent, msg.key) for agent, msg in map(astuple, fx.sends) if isinstance(msg, pm.CancelTask)
    ]


def test_wide_tasks_and_uploads_survive_a_restart() -> None:
    core, _, j = _ready_cluster(n_agents=1, slots=4)
    for i in range(3):
        core.add_task("wi", JOB, m.TaskAdd(name=f"w{i}", command_line="x", required_slots=2))
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    assert [s.task for _, s in runs] == ["w0", "w1"]  # 4 slots: two 2-slot tasks
    agent, spec = runs[0]
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=0,
            start_time=1.0,
            end_time=2.0,
            uploaded=[pm.OutputUploaded("out/a.txt", "ab" * 32, 3)],
        ),
    )
    j.apply(core.take_effects())
    again, _, _ = _core()
    again.restore(j.load())
    job, t = again.get_task("wi", JOB, "w0")
    assert t.uploaded == [("out/a.txt", "ab" * 32, 3)]
    assert job.wide
    assert again.get_task("wi", JOB, "w2")[1].slots == 2


def _mpi_cluster(n: int = 3):
    core, clock, j = _core()
    for i in range(n):
        _hello(core, f"a{i}")
    core.add_pool(m.PoolAdd(name="p", target_dedicated=n, communication=True))
    for tvm in list(core.tvms.values()):
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(_wi())
    j.apply(core.take_effects())
    core.add_task(
        "wi",
        JOB,
        m.TaskAdd(
            name="t",
            command_line="app",
            multi_instance_settings=m.MultiInstanceSettings(
                number_of_instances=n, coordination_command_line="coord"
            ),
        ),
    )
    core.schedule()
    subs = _runs(j.apply(core.take_effects()))
    return core, j, subs


def _started(core, agent, spec) -> None:
    core.agent_message(
        agent, pm.TaskStarted(key=spec.key, attempt=spec.attempt, start_time=core.clock())
    )


def test_gang_runs_coordination_then_the_application_and_ends_whole() -> None:
    core, j, subs = _mpi_cluster()
    assert [s.key for _, s in subs] == [f"wi/{JOB}/t~{i}" for i in range(3)]
    assert {s.command_line for _, s in subs} == {"coord"}
    assert len({a for a, _ in subs}) == 3
    assert [s.system_env["AZ_BATCH_IS_CURRENT_NODE_MASTER"] for _, s in subs] == [
        "true",
        "false",
        "false",
    ]
    assert all(t.free == 0 for t in core.tvms.values())
    for agent, spec in subs[:2]:
        _started(core, agent, spec)
    assert _runs(core.take_effects()) == []  # not before every instance started
    _started(core, *subs[2])
    ((agent, app),) = _runs(core.take_effects())
    assert (agent, app.key, app.command_line) == (subs[0][0], f"wi/{JOB}/t", "app")
    assert app.system_env["TVM_INSTANCE_INDEX"] == "0"
    # An instance that ends well early holds its TVM until the task ends.
    _done(core, *subs[1])
    assert all(t.free == 0 for t in core.tvms.values())
    _done(core, agent, app, code=0)
    fx = core.take_effects()
    assert sorted(_cancels(fx), key=lambda c: c[1]) == [
        (subs[0][0], subs[0][1].key),
        (subs[2][0], subs[2][1].key),
    ]
    t = core.get_task("wi", JOB, "t")[1]
    assert (t.state, t.exit_code, t.failure) == ("completed", 0, None)
    assert all(t.free == 1 and t.rec.state == "idle" for t in core.tvms.values())
    subs_seen = core.runs.gangs.last[f"wi/{JOB}/t"]
    assert [s.state for s in subs_seen] == ["completed"] * 3
    assert subs_seen[1].exit_code == 0


def test_a_failed_instance_fails_the_task_and_a_lost_tvm_requeues_it() -> None:
    core, j, subs = _mpi_cluster()
    core.agent_message(
        subs[2][0],
        pm.TaskCompleted(
            key=subs[2][1].key, attempt=subs[2][1].attempt, exit_code=4, start_time=1, end_time=2
        ),
    )
    fx = core.take_effects()
    t = core.get_task("wi", JOB, "t")[1]
    assert (t.state, t.exit_code, t.failure[1]) == ("completed", 4, "SubtaskFailed")
    assert "instance 2" in t.failure[2]
    assert sorted(k for _, k in _cancels(fx)) == [f"wi/{JOB}/t~0", f"wi/{JOB}/t~1"]
    assert all(t.free == 1 for t in core.tvms.values())

    core, j, subs = _mpi_cluster()
    core.agent_exited(subs[1][0], "killed")  # its agent died: its TVM is lost
    fx = core.take_effects()
    t = core.get_task("wi", JOB, "t")[1]
    assert (t.state, t.requeue_count) == ("active", 1)
    assert {k for _, k in _cancels(fx)} >= {f"wi/{JOB}/t~0", f"wi/{JOB}/t~2"}
    assert core.runs.gangs.gangs == {}


def test_terminate_stops_the_application_and_every_instance() -> None:
    core, j, subs = _mpi_cluster(2)
    for a, s in subs:
        _started(core, a, s)
    ((agent, app),) = _runs(core.take_effects())
    core.terminate_task("wi", JOB, "t")
    keys = sorted(k for _, k in _cancels(core.take_effects()))
    assert keys == [f"wi/{JOB}/t", f"wi/{JOB}/t~0", f"wi/{JOB}/t~1"]
    assert all(t.free == 1 for t in core.tvms.values())
