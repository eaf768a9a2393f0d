"""A coordinator SIGKILLed while a job preparation task runs, restarted on the same state dir: the
agent's run is adopted (not run twice), the job's tasks start once it succeeds, the status still
lists it, and the release task runs at the job's end."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from coordinator.client import Client
from coordinator.common import models as m
from tests.harness import (
    agent_env,
    free_port,
    remove_agent_cgroups,
    start_coordinator_process,
    sync_client,
    wait_sync,
)

JOB = "job-0000000001"


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


PREP = sh(
    'echo run >> "$AZ_BATCH_NODE_SHARED_DIR/prep-runs"; '
    'while [ ! -e "$AZ_BATCH_NODE_SHARED_DIR/go" ]; do sleep 0.05; done; echo ready > ok.txt'
)
RELEASE = sh('echo released >> "$AZ_BATCH_NODE_SHARED_DIR/release-runs"')


def _prep_state(client: Client) -> str | None:
    status = client.jobs.prep_release_status("wi", JOB)
    if not status or status[0].job_preparation_task_execution_info is None:
        return None
    return status[0].job_preparation_task_execution_info.state


def test_restart_while_prep_runs_adopts_it(tmp_path):
    state = str(tmp_path / "state")
    port = free_port()
    coord, env = start_coordinator_process(
        state, port, str(tmp_path / "coord.log"), "--heartbeat-timeout", "15"
    )
    root = tmp_path / "agent0"
    root.mkdir()
    log = open(tmp_path / "agent0.log", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "tvmagent", "--coordinator", env["TVM_ENDPOINT"]]
        + ["--root", str(root), "--name", "a0"],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=agent_env({"TVM_AGENT_TOKEN": env["TVM_JOIN_TOKEN"]}),
    )
    log.close()
    try:
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=1)
        wait_sync(lambda: [t for t in client.tvms.list("p") if t.state == "idle"], 30, "idle TVM")
        client.workitems.add(
            "wi",
            "p",
            job_preparation_task=m.JobPreparationTask(command_line=PREP),
            job_release_task=m.JobReleaseTask(command_line=RELEASE),
        )
        client.tasks.add("wi", JOB, "t1", sh('cat "$AZ_BATCH_JOB_PREP_WORKING_DIR/ok.txt"'))
        wait_sync(lambda: _prep_state(client) == "running", 30, "the preparation running")
        coord.send_signal(signal.SIGKILL)
        coord.wait()
        coord, _ = start_coordinator_process(
            state, port, str(tmp_path / "coord2.log"), "--heartbeat-timeout", "15"
        )
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        assert _prep_state(client) == "running"  # journaled
        wait_sync(
            lambda: [t for t in client.tvms.list("p") if t.state in ("idle", "running")],
            30,
            "the agent back",
        )
        assert client.tasks.get("wi", JOB, "t1").state == "active"  # still held by the gate
        (root / "shared" / "go").write_text("")
        counts = client.tasks.wait("wi", JOB, timeout=60)
        assert counts.succeeded == 1, counts
        out = client.files.get_from_task("wi", JOB, "t1", "stdout.txt")
        assert out.decode().strip() == "ready"
        # The running preparation was adopted, not started again.
        assert (root / "shared" / "prep-runs").read_text().split() == ["run"]
        [status] = client.jobs.prep_release_status("wi", JOB)
        info = status.job_preparation_task_execution_info
        assert (info.state, info.exit_code, info.retry_count) == ("completed", 0, 0)

        client.jobs.terminate("wi", JOB)
        wait_sync(lambda: client.jobs.get("wi", JOB).state == "completed", 30, "job completed")
        assert (root / "shared" / "release-runs").read_text().split() == ["released"]
        [status] = client.jobs.prep_release_status("wi", JOB)
        rel = status.job_release_task_execution_info
        assert (rel.state, rel.exit_code, rel.result) == ("completed", 0, "success")
    finally:
        for p in (coord, agent):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        remove_agent_cgroups("a0", str(root))  # what the killed agent kept for a restart
