"""System test (root): a job preparation task runs in the same sandbox as any task (its own
unprivileged user), and what it leaves is readable by the job's tasks (other users) but writable by
none of them, as Azure's job-prep directory is (its tasks run as the preparation's user there)."""

from __future__ import annotations

import os
import shlex
import stat

import pytest

from coordinator.common import models as m
from tests.harness import cluster_ctx
from tests.security.pool_groups import open_agent_base
from tvmagent.sandbox import SandboxCapabilities

ISOLATED = ["--task-isolation", "users"]
JOB = "job-0000000001"

_caps = SandboxCapabilities.detect()
pytestmark = pytest.mark.skipif(not _caps.can_switch_user, reason="needs root and setpriv")


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


PREP = sh("id -u > uid.txt; echo secret-ish > data.txt; chmod 600 data.txt; echo ready > ok.txt")
TASK = sh(
    'cd "$AZ_BATCH_JOB_PREP_WORKING_DIR" && echo "me=$(id -u) prep=$(cat uid.txt) $(cat ok.txt)"; '
    'if echo x > "$AZ_BATCH_JOB_PREP_WORKING_DIR/new.txt" 2>/dev/null; then echo write:allowed; '
    "else echo write:denied; fi; "
    'if cat "$AZ_BATCH_JOB_PREP_WORKING_DIR/data.txt" >/dev/null 2>&1; then echo owner-only:read; '
    "else echo owner-only:denied; fi"
)


@pytest.fixture
def open_root():
    with open_agent_base("tvm-jobprep-") as base:
        yield base


async def test_prep_output_is_readable_not_writable_by_the_jobs_tasks(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        agent = c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add(
            "wi", "p", job_preparation_task=m.JobPreparationTask(command_line=PREP)
        )
        await c.client.tasks.add("wi", JOB, "t", TASK)
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert counts.succeeded == 1, counts
        out = (await c.client.files.get_from_task("wi", JOB, "t", "stdout.txt")).decode().split()
        me, prep = int(out[0].split("=")[1]), int(out[1].split("=")[1])
        assert 0 not in (me, prep)  # both ran as task users
        # Read-only for the job's tasks, even a file the preparation kept to itself (Azure's tasks
        # share its user); written by none, even by a task given the same task user again.
        assert out[2:] == ["ready", "write:denied", "owner-only:read"], out
        prep_dir = os.path.join(agent.root, "tasks", "wi", JOB, "jobpreparation")
        for d in (prep_dir, os.path.join(prep_dir, "wd")):
            st = os.stat(d)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o750), d
            assert st.st_gid != 0  # the pool's group


@pytest.mark.skipif(not _caps.has_bwrap, reason="bubblewrap (bwrap) not installed")
async def test_a_bubblewrap_pool_shows_the_prep_directory_read_only(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, bubblewrap=True)
        await c.client.workitems.add(
            "wi", "p", job_preparation_task=m.JobPreparationTask(command_line=PREP)
        )
        await c.client.tasks.add("wi", JOB, "t", TASK)
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        task = await c.client.tasks.get("wi", JOB, "t")
        assert counts.succeeded == 1, task.execution_info
        out = (await c.client.files.get_from_task("wi", JOB, "t", "stdout.txt")).decode().split()
        # Inside the sandbox only the job's own preparation directory is shown, read-only.
        assert out[2:4] == ["ready", "write:denied"], out
