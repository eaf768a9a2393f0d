"""`tvm agent --task-user NAME`: every task runs as that one user, in a directory it owns (the
launcher enters the working directory as the task's user, as the task itself would)."""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.security.pool_groups import open_agent_base
from tvmagent.sandbox import SandboxCapabilities

JOB = "job-0000000001"

pytestmark = pytest.mark.skipif(
    not SandboxCapabilities.detect().can_switch_user, reason="needs root (switching users)"
)


@pytest.fixture
def fixed_user() -> Iterator[str]:
    name = f"tvmfx{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)


async def test_tasks_run_as_the_fixed_user_and_write_their_directory(nursery, tmp_path, fixed_user):
    os.makedirs(tmp_path / "agents", exist_ok=True)  # the harness's agent logs
    with open_agent_base("tvm-fixed-") as base:
        async with cluster_ctx(nursery, tmp_path) as c:
            c.start_agent(
                extra_args=["--task-isolation", "users", "--task-user", fixed_user],
                root=os.path.join(base, "a0"),
            )
            await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many(
                "wi",
                JOB,
                [task_spec("t", "/bin/sh -c 'id -u; echo made > result.txt; cat result.txt'")],
            )
            await c.client.tasks.wait("wi", JOB, timeout=60)
            task = await c.client.tasks.get("wi", JOB, "t")
            out = (await c.client.files.get_from_task("wi", JOB, "t", "stdout.txt")).decode()
            err = (await c.client.files.get_from_task("wi", JOB, "t", "stderr.txt")).decode()
            assert task.execution_info.exit_code == 0, (task.execution_info, out, err)
            assert out.split() == [str(pwd.getpwnam(fixed_user).pw_uid), "made"]
