"""A task run as its own user cannot make the agent (root) upload what the task could not read:
symlinks to a root-only file or to a directory outside, and hard links to a root-only file, are
never uploaded; the task's own files are."""

from __future__ import annotations

import os

import pytest

from coordinator.client import output_file
from tests.blobserver import blob_server
from tests.harness import cluster_ctx
from tests.security.pool_groups import open_agent_base
from tvmagent.sandbox import SandboxCapabilities

JOB = "job-0000000001"
_caps = SandboxCapabilities.detect()
pytestmark = pytest.mark.skipif(
    not (_caps.can_switch_user and os.path.exists("/etc/shadow")),
    reason="needs root with user switching, and /etc/shadow",
)


@pytest.fixture
def open_root():
    with open_agent_base("tvm-out-") as base:
        yield base


async def test_links_to_root_only_files_are_not_uploaded(nursery, tmp_path, open_root):
    with blob_server() as store:
        async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
            # The agent's log goes to tmp_path/agents (its root is elsewhere).
            os.makedirs(tmp_path / "agents", exist_ok=True)
            c.start_agent(
                extra_args=["--task-isolation", "users"], root=os.path.join(open_root, "a0")
            )
            await c.pool_with_tvms("p", 1)
            await c.client.workitems.add("wi", "p")
            url = store.url("links")
            await c.client.tasks.add(
                "wi",
                JOB,
                "links",
                "/bin/sh -c 'mkdir out && echo mine > out/mine.txt"
                " && ln -s /etc/shadow out/shadow.txt && ln -s /etc out/etc"
                " && (ln /etc/shadow out/hard.txt || true) && id -u > out/uid.txt'",
                output_files=[
                    output_file("out/**", container_url=url),
                    output_file("out/shadow.txt", container_url=url, path="one"),
                    output_file("out/etc/shadow", container_url=url, path="two"),
                ],
            )
            await c.client.tasks.wait("wi", JOB, timeout=60)
            t = await c.client.tasks.get("wi", JOB, "links")
            assert t.execution_info.exit_code == 0, t.execution_info
            assert t.execution_info.scheduling_error is None
            got = sorted(p for p in store.blobs if p.startswith("/links/"))
            assert got == ["/links/mine.txt", "/links/uid.txt"]
            assert store.blobs["/links/uid.txt"].strip() != b"0"  # it ran as a task user
