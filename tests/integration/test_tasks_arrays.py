"""Task arrays over a real coordinator and real agents: the client's `add_array` with 1,000 indexes
(each task writes its index, every one is checked), and `tvm task add-array` / `tvm task wait` as
subprocesses: bad ranges refused, failures reported by name and index."""

from __future__ import annotations

import pytest
import trio

from coordinator.client import parse_range
from tests.harness import cluster_ctx
from tests.integration.test_cli import _env, tvm

JOB = "job-0000000001"


@pytest.mark.parametrize(
    "n", [100, pytest.param(1000, marks=pytest.mark.slow, id="1000")], ids=lambda n: str(n)
)
async def test_an_array_gets_every_index(nursery, tmp_path, n):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        await c.pool_with_tvms("p", 2, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        seen: list[tuple[int, int]] = []
        indexes = parse_range(f"0-{2 * n - 2}:2")
        assert len(indexes) == n
        res = await c.client.tasks.add_array(
            "wi",
            JOB,
            "/bin/sh -c 'echo {} $TVM_TASK_INDEX $BATCH_TASK_INDEX'",
            indexes,
            progress=lambda done, total: seen.append((done, total)),
        )
        assert len(res) == n
        assert {r.status for r in res} == {"success"}
        assert seen[-1] == (n, n)
        assert len(seen) == n // 100  # one collection of 100 at a time
        counts = await c.client.tasks.wait("wi", JOB, timeout=300)
        assert (counts.succeeded, counts.failed) == (n, 0)

        outs: dict[str, str] = {}
        limit = trio.Semaphore(16)

        async def read(name: str) -> None:
            async with limit:
                data = await c.client.files.get_from_task("wi", JOB, name, "stdout.txt")
            outs[name] = data.decode().strip()

        async with trio.open_nursery() as n:
            for i in indexes:
                n.start_soon(read, str(i))
        assert outs == {str(i): f"{i} {i} {i}" for i in indexes}


async def test_cli_add_array_and_wait_report_failures_by_index(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        env = _env(
            {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        )
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        for bad, why in (
            ("5-1", "before the start"),
            ("1-10:0", "step must be at least 1"),
            ("a-b", "START-END[:STEP]"),
            ("0-1000000", "at most 1000000"),
        ):
            r = await tvm(
                "task", "add-array", "wi", JOB, "--range", bad, "--", "true", env=env, ok=False
            )
            assert r.returncode == 2, r.stderr
            assert why in r.stderr.decode()
        assert await c.client.tasks.list("wi", JOB) == []
        r = await tvm(
            "task",
            "add-array",
            "wi",
            JOB,
            "--range",
            "1-6",
            "--prefix",
            "t",
            "--",
            "/bin/sh",
            "-c",
            "exit $(( {} % 3 == 0 ))",
            env=env,
        )
        assert "added 6 task(s) of the array 1-6, 0 refused" in r.stdout.decode()
        r = await tvm("task", "wait", "wi", JOB, "--timeout", "60", env=env, ok=False)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert "failed: t3 (index 3): exit code 1" in err
        assert "failed: t6 (index 6): exit code 1" in err
        assert "t1 " not in err
        # A prefix that makes bad names: every task is refused, with the reason.
        r = await tvm(
            "task",
            "add-array",
            "wi",
            JOB,
            "--range",
            "1-2",
            "--prefix",
            "no way",
            "--",
            "true",
            env=env,
            ok=False,
        )
        assert r.returncode == 1
        assert "added 0 task(s)" in r.stdout.decode()
        assert "InvalidPropertyValue" in r.stderr.decode()
