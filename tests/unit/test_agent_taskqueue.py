"""The agent's task slots and queue (tvmagent/taskqueue.py through tvmagent/state.py): tasks beyond
the TVM's slots wait in arrival order and start as slots free; a waiting task that is cancelled,
deleted, drained, wiped or left waiting too long is answered without ever starting."""

from __future__ import annotations

from protocol import messages as pm
from protocol.exitcodes import NO_EXIT_CODE
from tvmagent.state import (
    AgentState,
    CancelReceived,
    DeleteFilesReceived,
    DeleteTaskFiles,
    DrainStarted,
    KillProcess,
    QueueTick,
    RunFinished,
    RunTaskReceived,
    Send,
    SendCompletion,
    StartRun,
    TvmSetUp,
    Welcomed,
    WipeStarted,
)
from tvmagent.taskqueue import WAIT_S

NOW = 1_000_000.0


def spec(name: str, attempt: int = 1, slots: int = 1) -> pm.TaskSpec:
    return pm.TaskSpec(
        key=f"wi/job/{name}",
        attempt=attempt,
        command_line="true",
        workitem="wi",
        job="job",
        task=name,
        slots=slots,
    )


def agent(slots: int, minor: int = pm.PROTOCOL_MINOR) -> AgentState:
    s = AgentState()
    s.handle(Welcomed(minor))
    s.handle(TvmSetUp("tvm-1", slots))
    return s


def started(out: list[object]) -> list[str]:
    return [i.spec.task for i in out if isinstance(i, StartRun)]


def completions(out: list[object]) -> list[pm.TaskCompleted]:
    return [i.msg for i in out if isinstance(i, SendCompletion)]


def run(s: AgentState, *names: str, at: float = NOW) -> list[str]:
    out: list[str] = []
    for n in names:
        out += started(s.handle(RunTaskReceived(spec(n), at)))
    return out


def finish(s: AgentState, name: str) -> list[object]:
    return s.handle(RunFinished(f"wi/job/{name}", 0, NOW, NOW + 1, None, peer_acked=0, uploaded=[]))


def test_tasks_beyond_the_slots_wait_and_start_in_arrival_order_as_slots_free() -> None:
    s = agent(2)
    assert run(s, "a", "b", "c", "d") == ["a", "b"]
    assert list(s.slots.waiting) == ["wi/job/c", "wi/job/d"]
    # Waiting tasks are the agent's (a reconnect reports them, so the coordinator keeps them placed).
    assert {r.key for r in s.hello_running()} == {f"wi/job/{n}" for n in "abcd"}
    out = finish(s, "b")
    assert started(out) == ["c"]
    assert len(completions(out)) == 1
    assert started(finish(s, "a")) == ["d"]
    assert started(finish(s, "c")) == []
    assert finish(s, "c") == []  # a second end of the same run frees nothing
    assert started(finish(s, "d")) == []
    assert s.slots.busy == 0
    assert not s.running


def test_a_wide_task_waits_for_its_slots_and_nothing_overtakes_it() -> None:
    s = agent(3)
    assert run(s, "a", "b") == ["a", "b"]
    assert started(s.handle(RunTaskReceived(spec("wide", slots=2), NOW))) == []
    assert run(s, "small") == []  # one slot is free, but the wide task came first
    assert started(finish(s, "a")) == ["wide"]  # 1 + 2 slots
    assert started(finish(s, "b")) == ["small"]
    assert s.slots.busy == 3


def test_runs_outside_the_slots_never_wait() -> None:
    # Job preparation/release runs and a gang's instances (slots=0) are counted by the coordinator.
    s = agent(1)
    assert run(s, "a", "b") == ["a"]
    assert started(s.handle(RunTaskReceived(spec("prep", slots=0), NOW))) == ["prep"]
    assert s.slots.busy == 1


def test_without_slots_from_the_join_nothing_waits() -> None:
    s = AgentState()
    s.handle(Welcomed(pm.PROTOCOL_MINOR))
    s.handle(TvmSetUp("tvm-1"))
    assert run(s, "a", "b", "c") == ["a", "b", "c"]


def test_a_coordinator_that_does_not_say_what_runs_take_gets_no_slots_kept() -> None:
    # Before QUEUE_MINOR a job preparation task came as a one-slot TaskSpec beside the slot's task:
    # keeping slots would hold that task back.
    s = agent(1, minor=pm.QUEUE_MINOR - 1)
    assert run(s, "prep", "a") == ["prep", "a"]
    # Tasks that waited for a newer coordinator start when the link comes back to an older one.
    s = agent(1)
    run(s, "a", "b")
    assert started(s.handle(Welcomed(pm.QUEUE_MINOR - 1))) == ["b"]
    assert not s.slots.waiting


def test_a_waiting_task_cancelled_is_answered_without_starting_or_a_kill() -> None:
    s = agent(1)
    run(s, "a", "b")
    assert s.handle(CancelReceived("wi/job/b", 2, "other attempt", NOW + 1)) == []
    out = s.handle(CancelReceived("wi/job/b", 1, "job terminated", NOW + 2))
    assert not any(isinstance(i, KillProcess) for i in out)
    (done,) = completions(out)
    assert done.key == "wi/job/b"
    assert done.exit_code == NO_EXIT_CODE
    assert done.failure is not None
    assert done.failure.code == "TaskEnded"
    assert "job terminated" in done.failure.message
    assert (done.start_time, done.end_time) == (NOW, NOW + 2)
    assert "wi/job/b" not in s.running
    assert started(finish(s, "a")) == []  # it does not start later


def test_a_waiting_task_deleted_leaves_no_process_to_kill() -> None:
    s = agent(1)
    run(s, "a", "b")
    out = s.handle(DeleteFilesReceived("wi/job/b"))
    assert DeleteTaskFiles("wi/job/b", cleaned=False) in out
    assert not any(isinstance(i, KillProcess) for i in out)
    assert [c.key for c in completions(out)] == ["wi/job/b"]
    assert started(finish(s, "a")) == []


def test_a_task_that_waited_too_long_is_handed_back_unstarted() -> None:
    s = agent(1)
    run(s, "a")
    run(s, "b", at=NOW + 0.5)
    assert s.handle(QueueTick(NOW + WAIT_S - 0.01)) == []
    (back,) = completions(s.handle(QueueTick(NOW + 0.5 + WAIT_S)))
    assert back.key == "wi/job/b"
    assert back.failure is not None
    assert back.failure.code == pm.QUEUE_HANDED_BACK
    # The coordinator learns how long it waited (it stops queueing that job).
    assert back.end_time - back.start_time == WAIT_S
    assert "wi/job/b" not in s.running
    assert "wi/job/a" in s.running


def test_a_drain_hands_back_what_waits_and_lets_the_runs_finish() -> None:
    s = agent(1)
    run(s, "a", "b", "c")
    out = s.handle(DrainStarted())
    back = completions(out)
    assert [c.key for c in back] == ["wi/job/b", "wi/job/c"]
    assert all(c.failure is not None and c.failure.code == pm.AGENT_STOPPING for c in back)
    assert any(isinstance(i, Send) and isinstance(i.msg, pm.Draining) for i in out)
    assert not any(isinstance(i, KillProcess) for i in out)
    assert started(finish(s, "a")) == []


def test_a_wipe_answers_what_waits_and_kills_what_runs() -> None:
    s = agent(1)
    run(s, "a", "b")
    out = s.handle(WipeStarted())
    assert [i for i in out if isinstance(i, KillProcess)] == [KillProcess("wi/job/a")]
    (done,) = completions(out)
    assert done.key == "wi/job/b"
    assert done.failure is not None
    assert done.failure.code == "TaskEnded"


def test_a_new_attempt_of_a_finishing_task_takes_its_slots() -> None:
    s = agent(1)
    run(s, "a", "b")
    # The coordinator requeued a and placed it here again while its old run is being cancelled.
    assert s.handle(RunTaskReceived(spec("a", attempt=2), NOW)) == []
    out = finish(s, "a")
    assert started(out) == ["a"]  # the new attempt, not b: one slot
    assert s.slots.busy == 1
    assert list(s.slots.waiting) == ["wi/job/b"]
