"""Issue 5 with real agents: the pool start task (waitForSuccess, retries, failure file, env and
resource files, startTaskInfo) and TVM reboot / reimage re-running it."""

from __future__ import annotations

import os
import shlex

from coordinator.common import models as m
from tests.harness import cluster_ctx

JOB = "job-0000000001"


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


async def _tvm(c, pool: str):  # noqa: ANN001, ANN202
    tvms = await c.client.tvms.list(pool)
    return tvms[0] if tvms else None


async def _state(c, pool: str, state: str):  # noqa: ANN001, ANN202
    t = await _tvm(c, pool)
    return t if t is not None and t.state == state else None


async def test_failing_start_task_keeps_tasks_off_the_tvm(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        st = m.StartTask(command_line=sh("echo trying; exit 3"), max_task_retry_count=1)
        await c.client.pools.add("p", target_dedicated=1, start_task=st)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "/bin/true")
        tvm = await c.wait_for(lambda: _state(c, "p", "starttaskfailed"), what="starttaskfailed")
        info = tvm.start_task_info
        assert (info.state, info.exit_code, info.retry_count) == ("completed", 3, 1)
        assert info.start_time
        assert info.end_time
        failure = await c.client.files.get_from_tvm("p", tvm.name, "start/starttask-failure.txt")
        assert b"exit code 3" in failure
        assert b"2 attempt(s)" in failure
        # Ticks pass (the coordinator ticks every 0.4 s here); the task is never placed on the TVM.
        again = await c.client.tvms.get("p", tvm.name)
        assert again.state == "starttaskfailed"
        task = await c.client.tasks.get("wi", JOB, "t")
        assert task.state == "active"
        assert task.tvm_info is None


async def test_wait_for_success_holds_tasks_until_exit_zero(nursery, tmp_path):
    gate = tmp_path / "go"
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        blob = await c.client.files.upload(b"resource-data")
        st = m.StartTask(
            command_line=sh(
                f'while [ ! -e {gate} ]; do sleep 0.05; done; cat data.txt; echo " $FOO"'
            ),
            environment_settings=[m.EnvironmentSetting(name="FOO", value="bar")],
            resource_files=[m.ResourceFile(blob_source=blob["blobSource"], file_path="data.txt")],
        )
        await c.client.pools.add("p", target_dedicated=1, start_task=st)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "/bin/true")
        tvm = await c.wait_for(
            lambda: _state(c, "p", "waitingforstarttask"), what="waitingforstarttask"
        )
        assert tvm.start_task_info.state == "running"
        assert (await c.client.tasks.get("wi", JOB, "t")).state == "active"
        gate.write_text("")
        await c.wait_for(lambda: _state(c, "p", "idle"), what="idle after the start task")
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 1
        tvm = await c.client.tvms.get("p", tvm.name)
        assert tvm.start_task_info.state == "completed"
        assert tvm.start_task_info.exit_code == 0
        out = await c.client.files.get_from_tvm("p", tvm.name, "start/stdout.txt")
        assert out.decode().split() == ["resource-data", "bar"]
        task = await c.client.tasks.get("wi", JOB, "t")
        assert task.tvm_info.tvm_name == tvm.name  # execution info names its TVM


async def test_without_wait_for_success_tasks_start_at_once(nursery, tmp_path):
    gate = tmp_path / "never"
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        st = m.StartTask(
            command_line=sh(f"while [ ! -e {gate} ]; do sleep 0.05; done"), wait_for_success=False
        )
        await c.pool_with_tvms("p", 1, start_task=st)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "/bin/true")
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 1
        tvm = await _tvm(c, "p")
        assert tvm.start_task_info.state == "running"  # still running: tasks did not wait for it


async def test_reboot_reruns_start_task_and_requeues_running_task(nursery, tmp_path):
    runs = tmp_path / "runs.txt"
    gate = tmp_path / "gate"
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        st = m.StartTask(command_line=sh(f"echo run >> {runs}"))
        await c.pool_with_tvms("p", 1, start_task=st)
        tvm = await _tvm(c, "p")
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", sh(f"while [ ! -e {gate} ]; do sleep 0.05; done"))
        await c.wait_for(lambda: _state(c, "p", "running"), what="task running")
        await c.client.tvms.reboot("p", tvm.name)
        # The task was requeued, the start task ran again and the task runs once more.
        await c.wait_for(
            lambda: runs.exists() and runs.read_text().count("run") == 2, what="start task re-run"
        )
        await c.wait_for(lambda: _state(c, "p", "running"), what="task running again")
        gate.write_text("")
        await c.client.tasks.wait("wi", JOB, timeout=30)
        task = await c.client.tasks.get("wi", JOB, "t")
        assert task.execution_info.requeue_count == 1
        assert task.execution_info.exit_code == 0
        assert task.tvm_info.tvm_name == tvm.name


async def test_reimage_wipes_directories(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 1)
        tvm = await _tvm(c, "p")
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", sh("echo x > $WATASK_TVM_ROOT_DIR/shared/marker"))
        await c.client.tasks.wait("wi", JOB, timeout=30)
        agent_root = c.agents[0].root
        assert _exists(os.path.join(agent_root, "shared", "marker"))
        await c.client.tvms.reimage("p", tvm.name)
        await c.wait_for(lambda: _state(c, "p", "idle"), what="idle after reimage")
        await c.wait_for(
            lambda: not os.path.exists(os.path.join(agent_root, "shared", "marker")), what="wiped"
        )
        assert not _exists(os.path.join(agent_root, "tasks", "wi"))
        assert (await _tvm(c, "p")).name == tvm.name  # same TVM, same name


def _exists(path: str) -> bool:
    return os.path.exists(path)
