"""Active/standby coordinators on one PostgreSQL store: a standby answers 503 CoordinatorStandby
and prints the same export lines; SIGKILL of the active one while tasks run makes the standby take
over; agents and clients given both URLs follow it; every task completes, and runs, exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import pytest

from coordinator.client import BatchError, task_spec
from tests.harness import (
    agent_env,
    free_port,
    remove_agent_cgroups,
    start_coordinator_process,
    stop_process_groups,
    sync_client,
    wait_sync,
)

JOB = "job-0000000001"


def _agent(tmp_path: Path, i: int, urls: str, token: str) -> subprocess.Popen[bytes]:
    root = tmp_path / f"agent{i}"
    root.mkdir()
    log = open(tmp_path / f"agent{i}.log", "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tvmagent", "--coordinator", urls, "--root", str(root)]
            + ["--name", f"pg{os.getpid()}-{i}"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=agent_env({"TVM_AGENT_TOKEN": token}),
        )
    finally:
        log.close()


def test_standby_answers_503_and_a_clean_stop_hands_over_at_once(tmp_path: Path, pg_cluster: Any):
    url = pg_cluster.new_database()
    pa, pb = free_port(), free_port()
    a, env_a = start_coordinator_process(
        str(tmp_path / "a"), pa, str(tmp_path / "a.log"), "--store", url
    )
    b = None
    try:
        b, env_b = start_coordinator_process(
            str(tmp_path / "b"), pb, str(tmp_path / "b.log"), "--store", url
        )
        # The standby prints the store's account, the same key and join token as the active one.
        assert env_b["TVM_ACCOUNT"] == env_a["TVM_ACCOUNT"]
        assert env_b["TVM_KEY"] == env_a["TVM_KEY"]
        assert env_b["TVM_JOIN_TOKEN"] == env_a["TVM_JOIN_TOKEN"]
        resp = httpx2.get(f"{env_b['TVM_ENDPOINT']}/pools")
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "2"
        assert resp.json()["code"] == "CoordinatorStandby"
        assert "standby" in resp.json()["message"]
        # A single-URL client is told, not made to wait.
        with pytest.raises(BatchError) as err:
            sync_client(env_b["TVM_ENDPOINT"], env_a["TVM_ACCOUNT"], env_a["TVM_KEY"]).pools.list()
        assert err.value.code == "CoordinatorStandby"
        both = f"{env_a['TVM_ENDPOINT']},{env_b['TVM_ENDPOINT']}"
        client = sync_client(both, env_a["TVM_ACCOUNT"], env_a["TVM_KEY"])
        client.pools.add("p", target_dedicated=0, vm_size="small")
        a.send_signal(signal.SIGTERM)  # a clean stop gives the lease up
        assert a.wait(timeout=20) == 0
        started = time.monotonic()
        wait_sync(
            lambda: httpx2.get(f"{env_b['TVM_ENDPOINT']}/pools").status_code != 503,
            8,  # far less than the 10 s lease: handed over, not expired
            "the standby to take over",
        )
        assert time.monotonic() - started < 8
        assert [p.name for p in client.pools.list()] == ["p"]
        client.pools.add("q", target_dedicated=0, vm_size="small")
        assert client.endpoint == env_b["TVM_ENDPOINT"]
    finally:
        stop_process_groups([a, b])


def test_sigkill_of_the_active_coordinator_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, pg_cluster: Any
):
    url = pg_cluster.new_database()
    runs = tmp_path / "runs"
    runs.mkdir()
    pa, pb = free_port(), free_port()
    ttl = "4"
    a, env = start_coordinator_process(
        str(tmp_path / "a"), pa, str(tmp_path / "a.log"), "--store", url, "--lease-ttl", ttl
    )
    procs = [a]
    try:
        b, env_b = start_coordinator_process(
            str(tmp_path / "b"), pb, str(tmp_path / "b.log"), "--store", url, "--lease-ttl", ttl
        )
        procs.append(b)
        both = f"{env['TVM_ENDPOINT']},{env_b['TVM_ENDPOINT']}"
        agents = [_agent(tmp_path, i, both, env["TVM_JOIN_TOKEN"]) for i in range(2)]
        procs += agents
        client = sync_client(both, env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=2, max_tasks_per_vm=4, vm_size="medium")
        wait_sync(
            lambda: sum(t.state == "idle" for t in client.tvms.list("p")) == 2, 60, "2 idle TVMs"
        )
        client.workitems.add("wi", "p")
        cmd = f"/bin/sh -c 'echo $WATASK_TVM_NAME >> {runs}/$WATASK_TASK_NAME; sleep 0.02'"
        n = 2000
        specs = [task_spec(f"t{i:04d}", cmd) for i in range(n)]
        for i in range(0, n, 500):
            assert all(
                r.status == "success" for r in client.tasks.add_many("wi", JOB, specs[i : i + 500])
            )
        # A random moment while tasks are in flight.
        target = random.randint(200, 1200)
        wait_sync(lambda: len(os.listdir(runs)) >= target, 120, f"{target} tasks run")
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed = time.monotonic()
        wait_sync(
            lambda: httpx2.get(f"{env_b['TVM_ENDPOINT']}/pools").status_code != 503,
            30,
            "the standby to take over",
        )
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.1f} s (lease {ttl} s), killed at {target} runs")
        assert takeover < 15
        counts = client.tasks.wait("wi", JOB, timeout=180)
        assert counts.completed == n, counts
        assert counts.succeeded == n, counts
        tasks = client.tasks.list("wi", JOB)
        assert len(tasks) == n
        assert all(t.state == "completed" and t.execution_info.exit_code == 0 for t in tasks)
        ran = Counter({p.name: len(p.read_text().splitlines()) for p in runs.iterdir()})
        assert set(ran) == {s.name for s in specs}
        twice = {k: v for k, v in ran.items() if v != 1}
        assert not twice, f"tasks run more than once: {twice}"
        # Agents that tried the standby before it took over were told why, not a bare 403.
        said = "".join((tmp_path / f"agent{i}.log").read_text() for i in range(2))
        assert "HTTP 503 CoordinatorStandby" in said
        # The TVMs are back with the new active coordinator.
        assert sum(t.state == "idle" for t in client.tvms.list("p")) == 2
    finally:
        stop_process_groups(procs)
        for i in range(2):
            remove_agent_cgroups(f"pg{os.getpid()}-{i}", str(tmp_path / f"agent{i}"))


def test_a_database_restart_is_ridden_out_without_losing_a_completion(
    tmp_path: Path, pg_cluster: Any
):
    """The database restarts (an upgrade, a failover of its own) while a task runs: the active
    coordinator keeps its lease and goes on — no restart of its own — once the server is back; the
    completion that arrived meanwhile is committed, and commands work again."""
    url = pg_cluster.new_database()
    port = free_port()
    c, env = start_coordinator_process(
        str(tmp_path / "c"), port, str(tmp_path / "c.log"), "--store", url, "--lease-ttl", "10"
    )
    procs: list[Any] = [c]
    try:
        procs.append(_agent(tmp_path, 0, env["TVM_ENDPOINT"], env["TVM_JOIN_TOKEN"]))
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=1, vm_size="small")
        wait_sync(lambda: [t.state for t in client.tvms.list("p")] == ["idle"], 60, "an idle TVM")
        client.workitems.add("wi", "p")
        client.tasks.add("wi", JOB, "during", "/bin/sh -c 'sleep 3; echo ran'")
        wait_sync(lambda: client.tasks.get("wi", JOB, "during").state == "running", 30, "running")
        pg_cluster.stop()  # every connection of the coordinator is dropped
        try:
            with pytest.raises(BatchError) as refused:
                client.tasks.add("wi", JOB, "refused", "/bin/true")
            assert refused.value.code == "StoreUnavailable", refused.value
            time.sleep(3)  # the task ends, its completion cannot be committed
        finally:
            pg_cluster.start()

        def add_after() -> bool:
            try:
                client.tasks.add("wi", JOB, "after", "/bin/echo after")
            except BatchError as exc:  # a 503 whose change landed later (see below)
                if exc.code != "TaskExists":
                    raise
            return True

        # Commands work again once the server is back.
        wait_sync(add_after, 30, "a command to be accepted again", tolerate_errors=True)
        uploaded = client.files.upload(b"kept in the store after its restart")
        counts = client.tasks.wait("wi", JOB, timeout=60)
        assert counts.failed == 0, counts
        assert c.poll() is None, "the coordinator stopped"
        # The command whose own commit failed was answered 503 (not acknowledged): like a
        # timeout, its change may still land once the commit is retried.
        names = {t.name for t in client.tasks.list("wi", JOB)}
        assert {"during", "after"} <= names <= {"during", "after", "refused"}, names
        # What was committed after the reconnection is in the store: a new coordinator reads it.
        c.send_signal(signal.SIGTERM)
        assert c.wait(timeout=20) == 0
        c2, env2 = start_coordinator_process(
            str(tmp_path / "c2"), free_port(), str(tmp_path / "c2.log"), "--store", url
        )
        procs.append(c2)
        again = sync_client(env2["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        tasks = {t.name: t for t in again.tasks.list("wi", JOB)}
        assert set(tasks) == names
        assert all(t.state == "completed" for t in tasks.values()), tasks
        assert tasks["during"].execution_info.exit_code == 0
        stored = {f["sha256"] for f in again.files.list_stored()}
        assert uploaded["sha256"] in stored
        log = (tmp_path / "c.log").read_text()
        assert "reconnected to" in log
        # The completion's failed commit closed the agent's link once; its next connection was a
        # new session (the agent sent again what it was not told was durable). A resumed one kept
        # the failed acknowledgement and failed every connection after it.
        marks = ("agent link failed", "the commit of what it sent failed")
        failed = sum(log.count(m) for m in marks)
        assert failed <= 2, f"the agent's link failed {failed} times"
        first = min((i for m in marks if (i := log.find(m)) >= 0), default=0)
        assert "connected (new session)" in log[first:]
    finally:
        stop_process_groups(procs)
        remove_agent_cgroups(f"pg{os.getpid()}-0", str(tmp_path / "agent0"))
