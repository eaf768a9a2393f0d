"""Issue 3, the AsyncClient under asyncio (anyio's asyncio backend), not only under Trio.

The coordinator runs in its own thread with its own Trio loop; the client runs in asyncio on the
main thread; one real agent process runs the tasks."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
import trio

from coordinator.client import AsyncClient, BatchError, task_spec
from coordinator.daemon.server import RunningCoordinator, run_coordinator
from tests.harness import agent_env

JOB = "job-0000000001"


@dataclass
class Background:
    rc: RunningCoordinator
    token: trio.lowlevel.TrioToken
    scope: trio.CancelScope
    thread: threading.Thread


@pytest.fixture
def coordinator(tmp_path) -> Iterator[Background]:
    started: queue.Queue[object] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                rc = await n.start(
                    lambda task_status: run_coordinator(
                        str(tmp_path / "state"), heartbeat_timeout=5, task_status=task_status
                    )
                )
                started.put((rc, trio.lowlevel.current_trio_token(), scope))

    def runner() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # surface start-up failures to the test
            started.put(exc)

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    item = started.get(timeout=30)
    if isinstance(item, BaseException):
        raise item
    rc, token, scope = item  # type: ignore[misc]
    bg = Background(rc, token, scope, thread)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvmagent",
            "--coordinator",
            rc.agent_url,
            "--root",
            str(tmp_path / "agent"),
            "--name",
            "a0",
            "--log-level",
            "warning",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=agent_env({"TVM_AGENT_TOKEN": rc.join_token}),
    )
    try:
        yield bg
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)


async def _scenario(rc: RunningCoordinator) -> None:
    # Runs under whichever event loop anyio was started with.
    async with AsyncClient(rc.endpoint, rc.account, rc.key) as client:
        await client.pools.add("p", target_dedicated=1, max_tasks_per_vm=2, vm_size="medium")
        await client.workitems.add("wi", "p")
        with anyio.fail_after(30):
            while True:  # polling the REST API: there is no event to wait on
                if [t for t in await client.tvms.list("p") if t.state in ("idle", "running")]:
                    break
                await anyio.sleep(0.05)
        results = await client.tasks.add_many(
            "wi",
            JOB,
            [
                task_spec(
                    f"t{i}", f'{sys.executable} -c "import sys; print({i}); sys.exit({i % 2})"'
                )
                for i in range(60)
            ],
        )
        assert len(results) == 60
        assert all(r.status == "success" for r in results)
        seen: list[int] = []
        counts = await client.tasks.wait(
            "wi", JOB, timeout=90, poll=0.1, progress=lambda c: seen.append(c.completed)
        )
        assert (counts.completed, counts.failed) == (60, 30)
        assert seen[-1] == 60
        # Concurrent requests on one client.
        pools, job, t7 = await gather(
            client.pools.list(), client.jobs.get("wi", JOB), client.tasks.get("wi", JOB, "t7")
        )
        assert [p.name for p in pools] == ["p"]
        assert job.task_counts.completed == 60
        assert t7.execution_info.exit_code == 1
        assert await client.files.get_from_task("wi", JOB, "t7", "stdout.txt") == b"7\n"
        # A file name that needs percent-encoding (and holds a '%') comes back byte for byte.
        await client.tasks.add(
            "wi", JOB, "odd", f"{sys.executable} -c \"open('a%41 b.txt', 'w').write('x')\""
        )
        await client.tasks.wait("wi", JOB, timeout=30, poll=0.1)
        names = {
            f.name for f in await client.files.list_from_task("wi", JOB, "odd", recursive=True)
        }
        assert "wd/a%41 b.txt" in names
        assert await client.files.get_from_task("wi", JOB, "odd", "wd/a%41 b.txt") == b"x"
        with pytest.raises(BatchError) as e:
            await client.pools.get("nope")
        assert (e.value.status, e.value.code) == (404, "PoolNotFound")


async def gather(*aws):  # noqa: ANN002, ANN201
    out = [None] * len(aws)

    async def one(i, aw):  # noqa: ANN001, ANN202
        out[i] = await aw

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(aws):
            tg.start_soon(one, i, aw)
    return out


def test_async_client_under_asyncio(coordinator):
    seen_loop = []

    async def main() -> None:
        seen_loop.append(asyncio.get_running_loop())  # really asyncio, not trio
        await _scenario(coordinator.rc)

    anyio.run(main, backend="asyncio")
    assert seen_loop


def test_async_client_plain_asyncio_run(coordinator):
    """Without anyio.run: a user's own asyncio.run() program."""

    async def main() -> list[str]:
        async with AsyncClient(
            coordinator.rc.endpoint, coordinator.rc.account, coordinator.rc.key
        ) as c:
            await asyncio.gather(*(c.pools.add(f"p{i}") for i in range(5)))
            return sorted(p.name for p in await c.pools.list())

    assert asyncio.run(main()) == [f"p{i}" for i in range(5)]
