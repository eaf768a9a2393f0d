"""Issue 3 §5 / DESIGN §4.1: SIGKILL the coordinator after tasks were acknowledged, restart it on the
same state dir: every pool, workitem, job and task is there, agents reconnect and report the tasks
that finished meanwhile, and no task runs twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from coordinator.client import task_spec
from tests.harness import (
    agent_env,
    free_port,
    remove_agent_cgroups,
    start_coordinator_process,
    sync_client,
    wait_sync,
)


def test_sigkill_coordinator_loses_nothing_and_runs_nothing_twice(tmp_path):
    state = str(tmp_path / "state")
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    coord, env = start_coordinator_process(
        state, port, str(tmp_path / "coord.log"), "--heartbeat-timeout", "15"
    )
    agents: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(2):
            root = tmp_path / f"agent{i}"
            root.mkdir()
            log = open(tmp_path / f"agent{i}.log", "ab")  # noqa: SIM115
            agents.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tvmagent",
                        "--coordinator",
                        env["TVM_ENDPOINT"],
                        "--root",
                        str(root),
                        "--name",
                        f"a{i}",
                    ],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=agent_env({"TVM_AGENT_TOKEN": env["TVM_JOIN_TOKEN"]}),
                )
            )
            log.close()
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=2, max_tasks_per_vm=2, vm_size="medium")
        wait_sync(
            lambda: sum(t.state == "idle" for t in client.tvms.list("p")) == 2, 30, "2 idle TVMs"
        )
        client.workitems.add("wi", "p")
        job = "job-0000000001"

        def cmd(seconds: float) -> str:
            return f"/bin/sh -c 'echo $WATASK_TASK_NAME $(date +%s.%N) $WATASK_TVM_NAME >> {runs}/$WATASK_TASK_NAME; sleep {seconds}'"

        quick = [task_spec(f"q{i:02d}", cmd(0)) for i in range(20)]
        slow = [task_spec(f"s{i:02d}", cmd(2)) for i in range(8)]
        assert all(r.status == "success" for r in client.tasks.add_many("wi", job, quick + slow))
        wait_sync(lambda: client.jobs.task_counts("wi", job).running >= 3, 30, "slow tasks running")
        before = {t.name: t.state for t in client.tasks.list("wi", job)}
        # Acknowledged just before the kill: must survive.
        client.tasks.add("wi", job, "late", "/bin/true")
        coord.send_signal(signal.SIGKILL)
        coord.wait()
        time.sleep(2.5)  # running tasks finish while the coordinator is down
        coord, env2 = start_coordinator_process(
            state, port, str(tmp_path / "coord2.log"), "--heartbeat-timeout", "15"
        )
        assert env2["TVM_KEY"] == env["TVM_KEY"]
        assert env2["TVM_ACCOUNT"] == env["TVM_ACCOUNT"]
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        assert [p.name for p in client.pools.list()] == ["p"]
        assert [w.name for w in client.workitems.list()] == ["wi"]
        assert [j.name for j in client.jobs.list("wi")] == [job]
        names = {t.name for t in client.tasks.list("wi", job)}
        assert names == set(before) | {"late"}
        counts = client.tasks.wait("wi", job, timeout=60)
        assert counts.completed == 29, counts
        assert counts.succeeded == 29, counts
        for t in client.tasks.list("wi", job):
            assert t.state == "completed", t
            assert t.execution_info.exit_code == 0, t
        ran = Counter(p.name for p in runs.iterdir() for _ in p.read_text().splitlines())
        assert all(n == 1 for n in ran.values()), f"tasks ran more than once: {ran}"
        assert set(ran) == names - {"late"}
        assert sum(t.state in ("idle", "running") for t in client.tvms.list("p")) == 2
    finally:
        for p in [coord, *agents]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for i in range(len(agents)):  # what the killed agents kept for a restart
            remove_agent_cgroups(f"a{i}", str(tmp_path / f"agent{i}"))
