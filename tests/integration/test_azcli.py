"""Microsoft's `az batch` (azure-cli), unmodified, against a real `tvm up` through
`AZURE_BATCH_ENDPOINT` / `AZURE_BATCH_ACCOUNT` / `AZURE_BATCH_ACCESS_KEY`: pools, nodes, jobs,
tasks, a task's file, job schedules and autoscale.

azure-cli is large (about two minutes to install into its cached virtual environment, then about
1.5 s per `az` command), so the test is marked `azcli` and left out of the default run:
`pytest -m azcli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.clientvenv import client_venv
from tests.tvmup import TvmUp, tvm_up

AZURE_CLI = ["azure-cli==2.91.0"]
IMAGE = "canonical:0001-com-ubuntu-server-jammy:22_04-lts"
SKU = "batch.node.ubuntu 22.04"

pytestmark = pytest.mark.azcli


class Az:
    """`az` with the three AZURE_BATCH_* variables and nothing of this repo's environment."""

    def __init__(self, exe: Path, up: TvmUp, home: Path) -> None:
        self.exe = exe
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "AZURE_CONFIG_DIR": str(home / ".azure"),
            "AZURE_CORE_COLLECT_TELEMETRY": "false",
            "AZURE_CORE_NO_COLOR": "true",
            "AZURE_BATCH_ENDPOINT": up.endpoint,
            "AZURE_BATCH_ACCOUNT": up.account,
            "AZURE_BATCH_ACCESS_KEY": up.key,
        }
        self.cwd = home
        self.up = up

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.exe), "batch", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
        )
        if ok and proc.returncode != 0:
            pytest.fail(
                f"az batch {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                f"\nstderr:\n{proc.stderr[-3000:]}\ntvm up log:\n{self.up.log_tail()}",
                pytrace=False,
            )
        return proc

    def json(self, *args: str) -> Any:
        out = self.run(*args, "--output", "json").stdout
        return json.loads(out) if out.strip() else None


def _wait(cond: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_az_batch_against_tvm_up(tmp_path: Path) -> None:
    python = client_venv("azure-cli", AZURE_CLI, timeout=1500)
    exe = python.parent / "az"
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "up").mkdir()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pool, job, sched = f"azp-{tag}", f"azj-{tag}", f"azs-{tag}"
    with tvm_up(tmp_path / "up", agents=2) as up:
        az = Az(exe, up, home)
        # Pools: create, list, show, resize, and the nodes it gets.
        az.run(
            "pool", "create", "--id", pool, "--vm-size", "Standard_D2s_v3", "--image", IMAGE,
            "--node-agent-sku-id", SKU, "--target-dedicated-nodes", "1",
        )  # fmt: skip
        assert pool in az.json("pool", "list", "--query", "[].id")
        shown = az.json("pool", "show", "--pool-id", pool)
        assert shown["id"] == pool
        assert shown["vmSize"] == "standard_d2s_v3"
        assert shown["targetDedicatedNodes"] == 1
        az.run("pool", "resize", "--pool-id", pool, "--target-dedicated-nodes", "2")

        def idle_nodes() -> list[dict[str, Any]] | None:
            nodes = az.json("node", "list", "--pool-id", pool)
            return nodes if len(nodes) == 2 and all(n["state"] == "idle" for n in nodes) else None

        nodes = _wait(idle_nodes, "two idle nodes")
        assert az.json("pool", "show", "--pool-id", pool)["currentDedicatedNodes"] == 2

        # Jobs and tasks, and a task's file.
        az.run("job", "create", "--id", job, "--pool-id", pool)
        assert job in az.json("job", "list", "--query", "[].id")
        assert az.json("job", "show", "--job-id", job)["state"] == "active"
        az.run(
            "task", "create", "--job-id", job, "--task-id", "t1",
            "--command-line", "/bin/sh -c 'echo hello from az'",
        )  # fmt: skip

        def completed() -> dict[str, Any] | None:
            t = az.json("task", "show", "--job-id", job, "--task-id", "t1")
            return t if t["state"] == "completed" else None

        task = _wait(completed, "the task to complete")
        assert task["executionInfo"]["exitCode"] == 0
        assert task["executionInfo"]["result"] == "success"
        assert task["nodeInfo"]["nodeId"] in {n["id"] for n in nodes}
        assert [t["id"] for t in az.json("task", "list", "--job-id", job)] == ["t1"]
        dest = tmp_path / "stdout.txt"
        az.run(
            "task", "file", "download", "--job-id", job, "--task-id", "t1",
            "--file-path", "stdout.txt", "--destination", str(dest),
        )  # fmt: skip
        assert dest.read_text() == "hello from az\n"

        # Job schedules: create (every five minutes, with a job manager), show, its job, delete.
        az.run(
            "job-schedule", "create", "--id", sched, "--pool-id", pool,
            "--recurrence-interval", "PT5M", "--start-window", "PT1H", "--priority", "3",
            "--job-manager-task-id", "jm", "--job-manager-task-command-line", "/bin/true",
            "--metadata", "owner=az",
        )  # fmt: skip
        s = az.json("job-schedule", "show", "--job-schedule-id", sched)
        assert s["schedule"] == {"recurrenceInterval": "PT5M", "startWindow": "PT1H"}
        assert s["jobSpecification"]["priority"] == 3
        assert s["jobSpecification"]["jobManagerTask"]["commandLine"] == "/bin/true"
        assert s["metadata"] == [{"name": "owner", "value": "az"}]

        def first_job() -> list[str] | None:
            ids = az.json("job", "list", "--job-schedule-id", sched, "--query", "[].id")
            return ids or None

        assert _wait(first_job, "the schedule's first job") == [f"{sched}:job-1"]
        assert (
            az.json("job-schedule", "show", "--job-schedule-id", sched)["executionInfo"][
                "recentJob"
            ]["id"]
            == f"{sched}:job-1"
        )
        az.run("job-schedule", "delete", "--job-schedule-id", sched, "--yes")
        gone = az.run("job-schedule", "show", "--job-schedule-id", sched, ok=False)
        assert gone.returncode != 0
        assert "JobScheduleNotFound" in gone.stderr

        # Autoscale with the modern names.
        az.run(
            "pool", "autoscale", "enable", "--pool-id", pool,
            "--auto-scale-formula", "$TargetDedicatedNodes = $CurrentDedicatedNodes;",
            "--auto-scale-evaluation-interval", "PT5M",
        )  # fmt: skip
        run = az.json(
            "pool", "autoscale", "evaluate", "--pool-id", pool,
            "--auto-scale-formula", "$TargetDedicatedNodes = min(2, $CurrentDedicatedNodes);",
        )  # fmt: skip
        assert run["results"] == (
            "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;$NodeDeallocationOption=requeue"
        )
        az.run("pool", "autoscale", "disable", "--pool-id", pool)
        assert az.json("pool", "show", "--pool-id", pool)["enableAutoScale"] is False

        # Deletes.
        az.run("job", "delete", "--job-id", job, "--yes")
        assert job not in az.json("job", "list", "--query", "[].id")
        az.run("pool", "delete", "--pool-id", pool, "--yes")

        def pool_gone() -> bool:
            return pool not in az.json("pool", "list", "--query", "[].id")

        _wait(pool_gone, "the pool to be deleted")
