"""The small pre-authentication websocket limit ends with the hello: an authenticated agent's
frames may be as large as the configured agent frame limit (a real agent, a 1 MiB file read)."""

from __future__ import annotations

from tests.harness import cluster_ctx

JOB = "job-0000000001"
MiB = 1024 * 1024


async def test_authenticated_agent_sends_frames_far_over_the_pre_auth_limit(
    nursery, tmp_path
) -> None:
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add(
            "wi", JOB, "big", f"sh -c 'head -c {MiB} /dev/zero | tr \"\\\\0\" x > big'"
        )

        async def done() -> bool:
            return (await c.client.tasks.get("wi", JOB, "big")).state == "completed"

        await c.wait_for(done, what="the task writing 1 MiB")
        # The agent answers with the whole file in one message (16 times the pre-auth limit).
        assert await c.client.files.get_from_task("wi", JOB, "big", "wd/big") == b"x" * MiB
        assert all(a.proc.poll() is None for a in c.agents)
