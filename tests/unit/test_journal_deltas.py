"""Completion deltas and unjournaled TVM idle <-> running flips, through the real journal (SQLite, and PostgreSQL where it exists: the `open_store` fixture)
and `restore`: a completion is one small row; a later full row of the task supersedes it; deleting
a task (or its job) deletes its delta; a restored TVM comes back idle until its agent reports tasks."""

from __future__ import annotations

from typing import Any

from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.core import TASK_DONE, CoordinatorState, Effects, Write
from coordinator.runtime.journal import SqliteStore
from protocol import messages as pm

JOB = "job-0000000001"


class Clock:
    now = 3_000_000.0

    def __call__(self) -> float:
        return self.now


def _apply(store: SqliteStore, core: CoordinatorState) -> Effects:
    fx = core.take_effects()
    store.apply(fx.writes)
    return fx


def _cluster(open_store: Any, slots: int = 4) -> tuple[CoordinatorState, SqliteStore, Clock]:
    clock = Clock()
    store = open_store("j.db")
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, max_tasks_per_vm=slots, vm_size="large"))
    tvm = next(iter(core.tvms.values()))
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    _apply(store, core)
    return core, store, clock


def _specs(fx: Effects) -> dict[str, pm.TaskSpec]:
    return {
        msg.spec.task: msg.spec for _, msg in map(astuple, fx.sends) if isinstance(msg, pm.RunTask)
    }


def _complete(core: CoordinatorState, spec: pm.TaskSpec, code: int) -> None:
    now = core.clock()
    core.agent_message(
        "a0",
        pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt, exit_code=code, start_time=now - 1, end_time=now
        ),
    )


def _restored(store: SqliteStore, clock: Clock, epoch: int = 2) -> CoordinatorState:
    again = CoordinatorState("acct", epoch=epoch, clock=clock, heartbeat_timeout=10.0)
    again.restore(store.load())
    return again


def _kinds(fx: Effects) -> list[tuple[str, bool]]:
    return [(w.kind, w.body is not None) for w in fx.writes if w.kind in ("task", TASK_DONE, "tvm")]


def test_completion_is_one_delta_row_and_restores(open_store: Any):
    core, store, clock = _cluster(open_store)
    core.add_tasks("wi", JOB, [m.TaskAdd(name=n, command_line="x") for n in ("ok", "bad")])
    core.schedule()
    specs = _specs(_apply(store, core))
    clock.now += 5
    _complete(core, specs["ok"], 0)
    _complete(core, specs["bad"], 2)
    fx = _apply(store, core)
    # Two delta rows, no full task row, and no TVM row for its running -> idle flip.
    assert _kinds(fx) == [(TASK_DONE, True), (TASK_DONE, True)]
    again = _restored(store, clock)
    tasks = again.jobs[f"wi/{JOB}"].tasks
    assert (tasks["ok"].state, tasks["ok"].exit_code, tasks["ok"].end_time) == (
        "completed",
        0,
        clock.now,
    )
    assert (tasks["bad"].state, tasks["bad"].exit_code) == ("completed", 2)
    assert tasks["ok"].failure is None
    assert list(again.jobs[f"wi/{JOB}"].queue) == []
    store.close()


def test_retry_delta_then_terminate_full_row_wins(open_store: Any):
    core, store, clock = _cluster(open_store)
    core.add_task(
        "wi",
        JOB,
        m.TaskAdd(
            name="r", command_line="x", task_constraints=m.TaskConstraints(max_task_retry_count=3)
        ),
    )
    core.schedule()
    spec = _specs(_apply(store, core))["r"]
    _complete(core, spec, 1)  # a retry: back in the queue, retryCount 1
    _apply(store, core)
    again = _restored(store, clock)
    r = again.jobs[f"wi/{JOB}"].tasks["r"]
    assert (r.state, r.retry_count, r.exit_code) == ("active", 1, 1)
    assert [t.name for t in again.jobs[f"wi/{JOB}"].queue] == ["r"]
    # A full row after the delta deletes the delta: restore must not lay the stale retry over it.
    core.terminate_task("wi", JOB, "r")
    fx = _apply(store, core)
    assert _kinds(fx) == [("task", True), (TASK_DONE, False)]
    again = _restored(store, clock, epoch=3)
    r = again.jobs[f"wi/{JOB}"].tasks["r"]
    assert (r.state, r.retry_count, r.failure and r.failure[1]) == ("completed", 1, "TaskEnded")
    store.close()


def test_deleted_task_or_job_takes_its_delta_along(open_store: Any):
    core, store, clock = _cluster(open_store)
    core.add_tasks("wi", JOB, [m.TaskAdd(name=n, command_line="x") for n in ("a", "b")])
    core.schedule()
    specs = _specs(_apply(store, core))
    _complete(core, specs["a"], 0)
    _complete(core, specs["b"], 0)
    _apply(store, core)
    # Same name again after a delete: the new task must not inherit the old completion.
    core.delete_task("wi", JOB, "a")
    core.add_task("wi", JOB, m.TaskAdd(name="a", command_line="again"))
    _apply(store, core)
    again = _restored(store, clock)
    a = again.jobs[f"wi/{JOB}"].tasks["a"]
    assert (a.state, a.exit_code, a.command_line) == ("active", None, "again")
    core.delete_job("wi", JOB)
    _apply(store, core)
    rows = list(store.load())
    assert [r for r in rows if r[0] in ("task", TASK_DONE)] == []
    store.close()


def test_restored_tvm_is_idle_until_its_agent_reports_tasks(open_store: Any):
    core, store, clock = _cluster(open_store)
    core.add_tasks("wi", JOB, [m.TaskAdd(name=n, command_line="x") for n in ("a", "b")])
    core.schedule()
    specs = _specs(_apply(store, core))
    tvm = next(iter(core.tvms.values()))
    assert tvm.rec.state == "running"
    # Journal it as running (as an older coordinator would have), then restore.
    core.runs.set_tvm_state(tvm, "offline")
    core.runs.set_tvm_state(tvm, "running")
    _apply(store, core)
    again = _restored(store, clock)
    twin = again.tvms[tvm.rec.name]
    assert twin.rec.state == "idle"
    again.agent_hello(
        pm.Hello(
            agent_id="a0",
            token="t",
            session_id="s",
            tvm_name=tvm.rec.name,
            running=[pm.RunningTask(key=specs["a"].key, attempt=specs["a"].attempt)],
        )
    )
    assert twin.rec.state == "running"
    assert set(twin.running) == {specs["a"].key}
    store.close()


def test_puts_in_multi_row_statements_keep_every_row_and_the_last_write_wins(open_store: Any):
    store = open_store("rows.db")
    for n in (2, 3, 4, 17, 256, 257, 600):
        writes = [Write("task", f"n{n}/k{i}", f"{n}:{i}".encode()) for i in range(n)]
        # The same key again later in the batch (and a delete between two runs of puts).
        writes.append(Write("task", f"n{n}/k0", b"last"))
        writes.append(Write("task", f"n{n}/gone", None))
        writes.append(Write("task", f"n{n}/k{n - 1}", b"after-delete"))
        store.apply(writes)
        rows = {k: b for kind, k, b in store.load() if k.startswith(f"n{n}/")}
        assert len(rows) == n
        assert rows[f"n{n}/k0"] == b"last"
        assert rows[f"n{n}/k{n - 1}"] == b"after-delete"
        assert all(rows[f"n{n}/k{i}"] == f"{n}:{i}".encode() for i in range(1, n - 1))
    store.close()
