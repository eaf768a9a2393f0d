"""Issue 9 §3: SIGKILL the coordinator (a real `tvm coordinator` process) while tasks run on a real
agent process, restart it on the same state dir and port: the agent reconnects and reconciles — the
running task keeps running (not requeued, not run twice), the result produced while the coordinator
was down is delivered exactly once. Also checks the coordinator's JSON log lines carry the agent id."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from coordinator.client import Client
from tests.harness import agent_env, close_pipes, free_port, start_coordinator_process

TVM = os.path.join(os.path.dirname(sys.executable), "tvm")
JOB = "job-0000000001"


def _wait(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - the coordinator may be restarting
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    close_pipes(proc)


def _gated(started: str, gate: str) -> str:
    return "sh -c " + shlex.quote(
        f"echo start >> {started}; while [ ! -e {gate} ]; do sleep 0.05; done; "
        f"echo end >> {started}"
    )


def test_coordinator_restart_keeps_running_tasks_and_delivers_results_once(tmp_path):
    state, port = str(tmp_path / "state"), free_port()
    long_log, long_gate = tmp_path / "long", tmp_path / "long.gate"
    meanwhile_log, meanwhile_gate = tmp_path / "meanwhile", tmp_path / "meanwhile.gate"
    clog = str(tmp_path / "coord.log")
    coord, env = start_coordinator_process(
        state, port, clog, "--heartbeat-timeout", "3", "--log-format", "json"
    )
    agent = None
    try:
        alog = open(tmp_path / "agent.log", "ab")  # noqa: SIM115
        agent = subprocess.Popen(
            [
                TVM,
                "agent",
                "--coordinator",
                env["TVM_ENDPOINT"],
                "--root",
                str(tmp_path / "root"),
                "--name",
                "steady",
            ],
            stdout=alog,
            stderr=alog,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=agent_env({"TVM_AGENT_TOKEN": env["TVM_JOIN_TOKEN"]}),
        )
        alog.close()
        c = Client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"], timeout=10)
        c.pools.add("p", target_dedicated=1, max_tasks_per_vm=2)
        _wait(lambda: [t for t in c.tvms.list("p") if t.state == "idle"], "an idle TVM")
        c.workitems.add("wi", "p")
        c.tasks.add("wi", JOB, "long", _gated(str(long_log), str(long_gate)))
        c.tasks.add("wi", JOB, "meanwhile", _gated(str(meanwhile_log), str(meanwhile_gate)))
        _wait(lambda: long_log.exists() and meanwhile_log.exists(), "both tasks started")
        before = {t.name: t for t in c.tasks.list("wi", JOB)}
        assert {t.state for t in before.values()} == {"running"}
        c.close()

        _kill(coord, signal.SIGKILL)
        meanwhile_gate.touch()  # finishes while nobody listens
        _wait(lambda: meanwhile_log.read_text() == "start\nend\n", "meanwhile finished")

        coord, env2 = start_coordinator_process(
            state, port, clog, "--heartbeat-timeout", "3", "--log-format", "json"
        )
        assert env2["TVM_KEY"] == env["TVM_KEY"]
        c = Client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"], timeout=10)
        done = _wait(
            lambda: [t for t in [c.tasks.get("wi", JOB, "meanwhile")] if t.state == "completed"],
            "the result produced meanwhile",
        )[0]
        assert done.execution_info.exit_code == 0
        assert done.execution_info.requeue_count == 0
        # The long task is still running, where it was, as the same run.
        long = _wait(
            lambda: [t for t in [c.tasks.get("wi", JOB, "long")] if t.state == "running"],
            "long task reconciled as running",
        )[0]
        assert long.tvm_info.tvm_name == before["long"].tvm_info.tvm_name
        assert long.execution_info.requeue_count == 0
        long_gate.touch()
        long = _wait(
            lambda: [t for t in [c.tasks.get("wi", JOB, "long")] if t.state == "completed"],
            "long task completed",
        )[0]
        assert long.execution_info.exit_code == 0
        # Each ran exactly once, and each completion was recorded once.
        assert long_log.read_text() == "start\nend\n"
        assert meanwhile_log.read_text() == "start\nend\n"
        counts = c.jobs.task_counts("wi", JOB)
        assert (counts.completed, counts.succeeded, counts.running, counts.active) == (2, 2, 0, 0)
        c.close()
        # JSON logs: every line one object; the link lines carry the agent id.
        with open(clog) as f:
            records = [json.loads(line) for line in f if line.strip()]
        connected = [
            r
            for r in records
            if "connected" in r.get("event", "") and r.get("logger") == "tvm.links"
        ]
        assert len(connected) >= 2  # before and after the restart
        assert all(r.get("agent") == "steady" for r in connected)
    finally:
        if agent is not None and agent.poll() is None:
            _kill(agent, signal.SIGTERM)
        _kill(coord, signal.SIGTERM)
