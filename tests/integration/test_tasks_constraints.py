"""Issue 4 item 1 with real agents: retries, the wall clock kill of a whole process tree, retention,
and constraints updated after add."""

from __future__ import annotations

import os
import uuid

import pytest
import trio

from coordinator.client import BatchError, task_spec
from coordinator.common import models as m
from tests.harness import cluster_ctx

JOB = "job-0000000001"
WALL_CLOCK_EXIT = 3221225786  # 0xC000013A


def _marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (setsid or orphaned ones included)."""
    needle = f"TVM_TEST_MARK={mark}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state not in ("Z", "X"):
            found.append(int(name))
    return found


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def _task(c, wi, name, job=JOB):
    return await c.client.tasks.get(wi, job, name)


async def _completed(c, wi, name, job=JOB):
    t = await _task(c, wi, name, job)
    return t if t.state == "completed" else None


@pytest.mark.skipif(not os.access("/proc/self/environ", os.R_OK), reason="needs /proc")
async def test_retries_wall_clock_retention_and_update(nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_AGENT_RETENTION_SWEEP_INTERVAL", "0.3")
    mark = uuid.uuid4().hex
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=5) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        await c.client.workitems.add(
            "wi2", "later", job_constraints=m.JobConstraints(max_task_retry_count=1)
        )
        env = {"TVM_TEST_MARK": mark}
        count = "$AZ_BATCH_NODE_SHARED_DIR/retries-$AZ_BATCH_TASK_ID"
        await c.client.tasks.add_many(
            "wi",
            JOB,
            [
                task_spec("retry", f"sh -c 'echo run >> {count}; exit 3'", max_task_retry_count=2),
                task_spec(
                    "tree",
                    "sh -c 'sleep 100 & sleep 100'",
                    env=env,
                    max_wall_clock_time="PT2S",
                    max_task_retry_count=3,
                ),
                task_spec(
                    "setsid",
                    "sh -c 'setsid sleep 100 & setsid sh -c \"sleep 100 &\"; sleep 100'",
                    env=env,
                    max_wall_clock_time="PT2S",
                ),
                task_spec("kept", "echo kept"),
                task_spec("gone", "echo gone", retention_time="PT1S"),
            ],
        )
        # Tasks waiting for a pool that does not exist yet: their constraints can still change.
        await c.client.tasks.add(
            "wi2",
            JOB,
            "patched",
            "sh -c 'echo x >> $AZ_BATCH_NODE_SHARED_DIR/patched; sleep 100'",
            env=env,
        )
        await c.client.tasks.add("wi2", JOB, "jobdefault", f"sh -c 'echo run >> {count}; exit 4'")
        await c.client.tasks.update(
            "wi2",
            JOB,
            "patched",
            max_wall_clock_time="PT1S",
            max_task_retry_count=0,
            retention_time="PT1H",
        )
        got = await _task(c, "wi2", "patched")
        assert got.task_constraints.max_wall_clock_time == "PT1S"
        assert got.task_constraints.max_task_retry_count == 0
        assert got.task_constraints.retention_time == "PT1H"
        assert (await _task(c, "wi2", "jobdefault")).task_constraints.max_task_retry_count == 1
        await c.pool_with_tvms("later", 1, max_tasks_per_vm=2)

        # maxTaskRetryCount = 2: three runs, each recorded.
        t = await c.wait_for(lambda: _completed(c, "wi", "retry"), what="retry completed")
        info = t.execution_info
        assert (info.exit_code, info.retry_count, info.requeue_count) == (3, 2, 0)
        assert info.last_retry_time
        assert info.scheduling_error is None
        tvm = t.tvm_info.tvm_name
        runs = await c.client.files.get_from_tvm("p", tvm, "shared/retries-retry")
        assert runs == b"run\n" * 3

        # The job's default (1) applies when the task says nothing.
        t = await c.wait_for(
            lambda: _completed(c, "wi2", "jobdefault"), what="jobdefault completed"
        )
        assert (t.execution_info.exit_code, t.execution_info.retry_count) == (4, 1)
        later_tvm = t.tvm_info.tvm_name
        assert (
            await c.client.files.get_from_tvm("later", later_tvm, "shared/retries-jobdefault")
            == b"run\n" * 2
        )

        # maxWallClockTime: killed with the whole tree, never retried.
        for wi, name in (("wi", "tree"), ("wi", "setsid"), ("wi2", "patched")):
            t = await c.wait_for(
                lambda wi=wi, name=name: _completed(c, wi, name), what=f"{name} completed"
            )
            info = t.execution_info
            assert info.exit_code == WALL_CLOCK_EXIT, name
            assert (info.scheduling_error.category, info.scheduling_error.code) == (
                "ServerError",
                "TaskEnded",
            )
            assert info.retry_count == 0, name
        assert await c.client.files.get_from_tvm("later", later_tvm, "shared/patched") == b"x\n"
        assert _marked_pids(mark) == []

        # retentionTime: the directory goes soon after expiry; file APIs then say so clearly.
        gone = await c.wait_for(lambda: _completed(c, "wi", "gone"), what="gone completed")
        holder = (await c.client.tvms.get("p", gone.tvm_info.tvm_name)).agent_id
        agent_root = next(a.root for a in c.agents if a.name == holder)
        gone_dir = os.path.join(agent_root, "tasks", "wi", JOB, "gone")

        async def cleaned():
            try:
                await c.client.files.list_from_task("wi", JOB, "gone")
            except BatchError as e:
                return e
            return None

        err = await c.wait_for(cleaned, timeout=20, what="gone's files cleaned up")
        assert (err.status, err.code) == (410, "TaskFilesCleanedUp")
        assert not _exists(gone_dir)
        with pytest.raises(BatchError) as e:
            await c.client.files.get_from_task("wi", JOB, "gone", "stdout.txt")
        assert (e.value.status, e.value.code) == (410, "TaskFilesCleanedUp")
        # A task with the default retention (7 days) keeps its files.
        await c.wait_for(lambda: _completed(c, "wi", "kept"), what="kept completed")
        assert await c.client.files.get_from_task("wi", JOB, "kept", "stdout.txt") == b"kept\n"
        # The agent's bookkeeping files beside task directories are not shown.
        names = {f.name for f in await c.client.files.list_from_tvm("p", tvm, recursive=True)}
        assert f"tasks/wi/{JOB}/kept/stdout.txt" in names
        assert not [n for n in names if n.endswith((".tvm-cleaned", ".tvm-retention"))]


async def test_bad_constraints_over_rest(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "ok", "true", max_task_retry_count=1)
        cases = [
            ({"max_task_retry_count": -2}, "maxTaskRetryCount"),
            ({"max_wall_clock_time": "-PT1S"}, "maxWallClockTime"),
            ({"max_wall_clock_time": "1 hour"}, "maxWallClockTime"),
            ({"retention_time": "P1Y"}, "retentionTime"),
            ({"retention_time": "PT-5S"}, "retentionTime"),
        ]
        for kw, field in cases:
            with pytest.raises(BatchError) as e:
                await c.client.tasks.add("wi", JOB, "bad", "true", **kw)
            assert (e.value.status, e.value.code) == (400, "InvalidPropertyValue"), kw
            assert field in e.value.message
            with pytest.raises(BatchError) as e:
                await c.client.tasks.update("wi", JOB, "ok", **kw)
            assert e.value.status == 400
            assert field in e.value.message
        names = [t.name for t in await c.client.tasks.list("wi", JOB)]
        assert names == ["ok"]
        ok = await c.client.tasks.get("wi", JOB, "ok")
        assert ok.task_constraints.max_task_retry_count == 1
        assert ok.task_constraints.retention_time == "P7D"


async def test_retention_survives_an_agent_restart(nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_AGENT_RETENTION_SWEEP_INTERVAL", "0.3")
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=5) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "r", "echo r", retention_time="PT3S")
        await c.wait_for(lambda: _completed(c, "wi", "r"), what="r completed")
        old = c.agents[0]
        old.kill()  # SIGKILL: only what the agent wrote to disk survives
        await trio.to_thread.run_sync(old.proc.wait)
        rdir = os.path.join(old.root, "tasks", "wi", JOB, "r")
        assert _exists(rdir)
        c.start_agent(old.name, root=old.root)
        await c.wait_for(
            lambda: not _exists(rdir), timeout=20, what="r's directory removed after restart"
        )

        async def cleaned():
            try:
                await c.client.files.list_from_task("wi", JOB, "r")
            except BatchError as e:
                return e.code == "TaskFilesCleanedUp"
            return False

        await c.wait_for(cleaned, what="TaskFilesCleanedUp after restart")
