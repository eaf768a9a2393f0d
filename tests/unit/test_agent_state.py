"""The agent's decisions (tvmagent/state.py), driven with events: no sockets, no Trio, no processes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tvmagent.state
from protocol import messages as pm
from protocol.exitcodes import WALL_CLOCK_EXIT_CODE
from tvmagent.state import (
    DISK_LIMIT_CODE,
    AgentState,
    CancelReceived,
    CompletionQueued,
    DeleteFilesReceived,
    DeleteTaskFiles,
    DiskMeasured,
    DrainGraceOver,
    DrainStarted,
    KillProcess,
    KillStartTask,
    QueueTvmOp,
    RebootStarted,
    Reimaged,
    RetentionLoaded,
    RetentionSweep,
    Run,
    RunFinished,
    RunTaskReceived,
    SaveRetention,
    Send,
    SendCompletion,
    SessionRestarted,
    StartRun,
    StartTaskBegan,
    StartTaskEnded,
    TvmOpReceived,
    TvmSetUp,
    TvmWiped,
    Warn,
    WipeStarted,
    rejected_for_good,
    run_verdict,
)

NOW = 1_000_000.0


def spec(
    key: str = "wi/job/t1", attempt: int = 1, retention_s: float = 600.0, wall: float = 0.0
) -> pm.TaskSpec:
    wi, job, task = key.split("/")
    return pm.TaskSpec(
        key=key,
        attempt=attempt,
        command_line="true",
        workitem=wi,
        job=job,
        task=task,
        retention_s=retention_s,
        max_wall_clock_s=wall,
    )


def joined() -> AgentState:
    s = AgentState()
    assert s.handle(TvmSetUp("tvm-1")) == []
    return s


def finish(
    s: AgentState,
    key: str = "wi/job/t1",
    code: int = 0,
    failure: pm.Failure | None = None,
    peer_acked: int = 0,
    end: float = NOW + 5,
) -> list:
    return s.handle(RunFinished(key, code, NOW, end, failure, peer_acked))


def completion(out: list) -> pm.TaskCompleted:
    (done,) = [i.msg for i in out if isinstance(i, SendCompletion)]
    return done


# ----------------------------------------------------------------------------- run


def test_run_task_starts_a_run_once() -> None:
    s = joined()
    assert s.handle(RunTaskReceived(spec(), NOW)) == [StartRun(spec())]
    assert list(s.running) == ["wi/job/t1"]
    assert s.handle(RunTaskReceived(spec(), NOW)) == []  # the same attempt again: a duplicate
    assert len(s.running) == 1


def test_run_task_without_a_tvm_is_answered_tvm_not_ready() -> None:
    s = AgentState()
    done = completion(s.handle(RunTaskReceived(spec(), NOW)))
    assert (done.key, done.attempt, done.exit_code) == ("wi/job/t1", 1, -1)
    assert done.failure is not None
    assert (done.failure.category, done.failure.code) == ("ServerError", "TVMNotReady")
    assert s.running == {}


def test_run_task_while_draining_is_handed_back_as_agent_stopping() -> None:
    s = joined()
    assert s.handle(DrainStarted()) == [Send(pm.Draining(reason="agent stopping"))]
    done = completion(s.handle(RunTaskReceived(spec(), NOW)))
    assert done.failure is not None
    assert done.failure.code == pm.AGENT_STOPPING
    assert s.running == {}


# ----------------------------------------------------------------------------- cancel


def test_cancel_kills_the_matching_attempt_only() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(attempt=2), NOW))
    assert s.handle(CancelReceived("wi/job/t1", 1, "old")) == []  # another attempt: not this run
    assert not s.running["wi/job/t1"].cancelled
    assert s.handle(CancelReceived("wi/job/t1", 2, "job terminated")) == [KillProcess("wi/job/t1")]
    run = s.running["wi/job/t1"]
    assert (run.cancelled, run.cancel_reason) == (True, "job terminated")
    assert s.handle(CancelReceived("wi/job/none", 1, "x")) == []


def test_a_cancelled_run_reports_task_killed() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(), NOW))
    s.handle(CancelReceived("wi/job/t1", 1, "job terminated"))
    code, failure = run_verdict(s.running["wi/job/t1"], -9, "killed", "", timed_out=False)
    assert failure == pm.Failure(
        category="UserError", code="TaskEnded", message="task killed: job terminated"
    )
    assert code == -9


# ----------------------------------------------------------------------------- deferred re-runs


def test_a_requeued_attempt_waits_for_the_old_run_then_starts() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(attempt=1), NOW))
    s.handle(CancelReceived("wi/job/t1", 1, "requeued"))
    assert (
        s.handle(RunTaskReceived(spec(attempt=2), NOW)) == []
    )  # deferred, not started beside the old one
    assert s.deferred["wi/job/t1"].attempt == 2
    out = finish(s, code=-9)
    assert StartRun(spec(attempt=2)) in out
    assert completion(out).attempt == 1  # the old attempt is still reported
    assert s.running["wi/job/t1"].spec.attempt == 2
    assert s.deferred == {}


def test_a_cancelled_deferred_attempt_never_starts() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(attempt=1), NOW))
    s.handle(RunTaskReceived(spec(attempt=2), NOW))
    s.handle(CancelReceived("wi/job/t1", 2, "job deleted"))
    assert s.deferred == {}
    assert not any(isinstance(i, StartRun) for i in finish(s))
    assert s.running == {}


def test_deferred_runs_do_not_survive_a_wipe() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(attempt=1), NOW))
    s.handle(RunTaskReceived(spec(attempt=2), NOW))
    assert s.handle(WipeStarted()) == [KillProcess("wi/job/t1")]
    assert s.deferred == {}
    assert not any(isinstance(i, StartRun) for i in finish(s))


# ----------------------------------------------------------------------------- completions and Hello


def test_completion_stays_unacknowledged_until_the_coordinator_acks_its_seq() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(), NOW))
    s.handle(RunTaskReceived(spec("wi/job/t2"), NOW))
    # While running, a Hello reports both as running (the coordinator requeues the others).
    assert s.hello_running() == [
        pm.RunningTask(key="wi/job/t1", attempt=1),
        pm.RunningTask(key="wi/job/t2", attempt=1),
    ]
    done = completion(finish(s))
    s.handle(CompletionQueued(done.key, done.attempt, seq=7))
    assert s.hello_running() == [pm.RunningTask(key="wi/job/t2", attempt=1)]
    # Finished but not acknowledged: reported so it is not requeued (its completion is on the way).
    assert s.hello_finished(peer_acked=6) == [pm.RunningTask(key="wi/job/t1", attempt=1)]
    assert s.hello_finished(peer_acked=7) == []
    s.acked(7)
    assert s.unacked_done == {}


def test_acknowledged_completions_are_forgotten_at_the_next_completion() -> None:
    s = joined()
    for key, seq in (("wi/job/t1", 3), ("wi/job/t2", 4)):
        s.handle(RunTaskReceived(spec(key), NOW))
        s.handle(CompletionQueued(key, 1, seq))
        s.running.pop(key)
    s.handle(RunTaskReceived(spec("wi/job/t3"), NOW))
    finish(s, "wi/job/t3", peer_acked=3)
    assert set(s.unacked_done) == {"wi/job/t2"}


def test_a_restarted_session_renumbers_what_is_still_unacknowledged() -> None:
    s = joined()
    s.unacked_done = {"wi/job/a": (1, 5), "wi/job/b": (2, 9)}
    s.handle(SessionRestarted(peer_acked=5, shift=4))
    assert s.unacked_done == {"wi/job/b": (2, 5)}
    assert s.hello_finished(peer_acked=0) == [pm.RunningTask(key="wi/job/b", attempt=2)]


# ----------------------------------------------------------------------------- drain


def test_drain_kills_what_outlives_the_grace_and_reports_it_as_agent_stopping() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(), NOW))
    s.handle(DrainStarted())
    assert s.draining
    assert s.handle(DrainGraceOver()) == [KillProcess("wi/job/t1")]
    run = s.running["wi/job/t1"]
    assert (run.cancelled, run.abandoned, run.cancel_reason) == (True, True, "agent stopped")
    done = completion(
        finish(s, code=-9, failure=pm.Failure(category="UserError", code="TaskEnded"))
    )
    assert done.failure is not None
    assert (done.failure.category, done.failure.code) == ("ServerError", pm.AGENT_STOPPING)


# ----------------------------------------------------------------------------- retention


def test_retention_deadline_is_recorded_and_swept_only_when_due_and_not_running() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(retention_s=60), NOW))
    out = finish(s, end=NOW + 5)
    assert SaveRetention("wi/job/t1", NOW + 65) in out
    assert s.handle(RetentionSweep(NOW + 64)) == []
    s.handle(
        RunTaskReceived(spec(attempt=2, retention_s=60), NOW + 64)
    )  # placed here again: its files are in use
    assert s.handle(RetentionSweep(NOW + 100)) == []
    assert "wi/job/t1" in s.retention
    finish(s, end=NOW + 101)
    assert s.retention["wi/job/t1"] == NOW + 101 + 60
    assert s.handle(RetentionSweep(NOW + 1000)) == [DeleteTaskFiles("wi/job/t1", cleaned=True)]
    assert s.retention == {}


def test_retention_loaded_after_a_restart_does_not_override_newer_deadlines() -> None:
    s = joined()
    s.retention["wi/job/a"] = NOW + 10
    s.handle(RetentionLoaded({"wi/job/a": NOW - 1, "wi/job/b": NOW - 1}))
    assert s.retention == {"wi/job/a": NOW + 10, "wi/job/b": NOW - 1}
    assert s.handle(RetentionSweep(NOW)) == [DeleteTaskFiles("wi/job/b", cleaned=True)]


def test_delete_task_files_kills_a_running_task_and_drops_its_deadline() -> None:
    s = joined()
    s.retention["wi/job/old"] = NOW + 10
    assert s.handle(DeleteFilesReceived("wi/job/old")) == [
        DeleteTaskFiles("wi/job/old", cleaned=False)
    ]
    assert s.retention == {}
    s.handle(RunTaskReceived(spec(), NOW))
    assert s.handle(DeleteFilesReceived("wi/job/t1")) == [
        KillProcess("wi/job/t1"),
        DeleteTaskFiles("wi/job/t1", cleaned=False),
    ]
    assert s.running["wi/job/t1"].cancelled


def test_reimage_and_wipe_forget_retention_deadlines_reboot_keeps_them() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec(), NOW))
    s.retention["wi/job/done"] = NOW + 10
    assert s.handle(RebootStarted()) == [KillProcess("wi/job/t1")]
    assert s.running["wi/job/t1"].cancel_reason == "TVM rebooting"
    assert "wi/job/done" in s.retention
    s.handle(Reimaged())
    assert s.retention == {}
    s.retention["wi/job/x"] = NOW
    s.handle(TvmWiped())
    assert (s.retention, s.tvm_name) == ({}, None)


# ----------------------------------------------------------------------------- TVM operations


def test_tvm_ops_are_queued_in_order_and_leave_or_reboot_interrupt_that_tvms_start_task() -> None:
    s = joined()
    run = Run(spec("x/y/starttask"))
    s.handle(StartTaskBegan(run))
    join = pm.JoinPool(pool="p", tvm_name="tvm-1", account="a")
    assert s.handle(TvmOpReceived(join)) == [QueueTvmOp(join)]  # a join does not interrupt
    other = pm.RebootTvm(tvm_name="tvm-2")
    assert s.handle(TvmOpReceived(other)) == [
        QueueTvmOp(other)
    ]  # another TVM's reboot: an old request
    assert not run.cancelled
    leave = pm.LeavePool(tvm_name="tvm-1")
    assert s.handle(TvmOpReceived(leave)) == [KillStartTask(), QueueTvmOp(leave)]
    assert (run.cancelled, run.cancel_reason) == (True, "TVM rebooted or removed")
    s.handle(StartTaskEnded(run))
    assert s.start_run is None
    assert s.handle(TvmOpReceived(pm.RebootTvm(tvm_name="tvm-1"))) == [
        QueueTvmOp(pm.RebootTvm(tvm_name="tvm-1"))
    ]


# ----------------------------------------------------------------------------- limits and verdicts


def test_disk_over_limit_kills_the_biggest_running_task_once() -> None:
    s = joined()
    s.handle(RunTaskReceived(spec("wi/job/a"), NOW))
    s.handle(RunTaskReceived(spec("wi/job/b"), NOW))
    assert s.handle(DiskMeasured({"wi/job/a": 10 << 20, "wi/job/b": 30 << 20}, 50 << 20)) == []
    out = s.handle(DiskMeasured({"wi/job/a": 10 << 20, "wi/job/b": 60 << 20}, 50 << 20))
    assert out[-1] == KillProcess("wi/job/b")
    assert isinstance(out[0], Warn)
    run = s.running["wi/job/b"]
    assert run.cancel_code == DISK_LIMIT_CODE
    assert "50 MiB" in run.cancel_reason
    assert s.handle(DiskMeasured({"wi/job/b": 60 << 20}, 50 << 20)) == []  # already being killed
    _, failure = run_verdict(run, -9, "killed", "", timed_out=False)
    assert failure is not None
    assert failure.code == DISK_LIMIT_CODE


@pytest.mark.parametrize(
    ("reason", "timed_out", "code", "failure_code"),
    [
        ("exited", True, WALL_CLOCK_EXIT_CODE, "TaskEnded"),
        ("launch_failed", False, -1, "CommandLaunchFailed"),
        ("oom", False, 137, "TaskMemoryLimitExceeded"),
        ("exited", False, 3, None),
    ],
)
def test_run_verdict(reason: str, timed_out: bool, code: int, failure_code: str | None) -> None:
    got_code, failure = run_verdict(
        Run(spec(wall=2)), code if not timed_out else -9, reason, "why", timed_out
    )
    assert got_code == code
    assert (failure.code if failure else None) == failure_code
    if timed_out:
        assert failure is not None
        assert failure.category == "ServerError"
        assert "maxWallClockTime of 2 s" in failure.message


def test_unknown_run_finishing_is_ignored() -> None:
    s = joined()
    assert finish(s, "wi/job/ghost") == []


@pytest.mark.parametrize(
    ("code", "fatal"),
    [
        ("AgentAlreadyConnected", False),
        ("InvalidAgentCredential", True),
        ("AgentRevoked", True),
        ("AgentRetired", True),
        ("InvalidJoinToken", True),
        ("SomethingNew", False),
    ],
)
def test_second_connection_refusal_is_retried_bad_credentials_are_not(
    code: str, fatal: bool
) -> None:
    assert rejected_for_good(code) is fatal


def test_the_state_machine_imports_no_io_library() -> None:
    # Its own imports (ast) and what importing it loads (trio must not come along).
    tree = ast.parse(Path(tvmagent.state.__file__).read_text())
    names = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    names |= {
        (n.module or "").split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and not n.level
    }
    assert not names & {
        "trio",
        "anyio",
        "os",
        "subprocess",
        "socket",
        "trio_websocket",
        "shutil",
        "threading",
    }
    code = "import sys, tvmagent.state; raise SystemExit(1 if {'trio', 'trio_websocket'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
