"""Issue 4 items 3 and 4 with real agents: environment settings, terminate, delete, list by state,
task counts."""

from __future__ import annotations

import json
import os
import sys
import uuid

import pytest

from coordinator.client import BatchError, task_spec
from coordinator.common import models as m
from tests.harness import cluster_ctx
from tests.integration.test_tasks_constraints import _exists, _marked_pids

JOB = "job-0000000001"
PRINT_ENV = f'{sys.executable} -c "import json, os; print(json.dumps(dict(os.environ)))"'


async def _state(c, name, state):
    t = await c.client.tasks.get("wi", JOB, name)
    return t if t.state == state else None


async def test_environment_terminate_delete_list_and_counts(nursery, tmp_path):
    mark = uuid.uuid4().hex
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        common = [
            m.EnvironmentSetting(name="COMMON", value="c"),
            m.EnvironmentSetting(name="BOTH", value="c"),
        ]
        await c.client.workitems.add("wi", "p", common_environment_settings=common)

        # System variables cannot be overridden, by a task or by the workitem.
        for name in ("WATASK_TASK_NAME", "AZ_BATCH_NODE_ID", "watask_pool_name"):
            with pytest.raises(BatchError) as e:
                await c.client.tasks.add("wi", JOB, "evil", "true", env={name: "x"})
            assert (e.value.status, e.value.code) == (400, "ReservedEnvironmentVariable")
            with pytest.raises(BatchError) as e:
                await c.client.workitems.add(
                    "wi-evil",
                    "p",
                    common_environment_settings=[m.EnvironmentSetting(name=name, value="x")],
                )
            assert (e.value.status, e.value.code) == (400, "ReservedEnvironmentVariable")
        assert [w.name for w in await c.client.workitems.list()] == ["wi"]

        await c.client.tasks.add_many(
            "wi",
            JOB,
            [
                task_spec("env", PRINT_ENV, env={"MINE": "m=1 two", "BOTH": "task"}),
                task_spec("fail", "sh -c 'exit 5'"),
                task_spec(
                    "long",
                    "sh -c 'sleep 100 & sleep 100'",
                    env={"TVM_TEST_MARK": mark},
                    max_task_retry_count=2,
                ),
                task_spec("keep", "sleep 100"),
            ],
        )
        got = await c.client.tasks.get("wi", JOB, "env")
        assert {(e.name, e.value) for e in got.environment_settings} == {
            ("MINE", "m=1 two"),
            ("BOTH", "task"),
        }
        await c.wait_for(lambda: _state(c, "env", "completed"), what="env completed")
        env = json.loads(await c.client.files.get_from_task("wi", JOB, "env", "stdout.txt"))
        assert (env["MINE"], env["BOTH"], env["COMMON"]) == ("m=1 two", "task", "c")
        assert env["WATASK_TASK_NAME"] == "env"
        assert env["WATASK_WORKITEM_NAME"] == "wi"

        # List with a state filter, and counts, while two tasks run.
        await c.wait_for(lambda: _state(c, "long", "running"), what="long running")
        await c.wait_for(lambda: _state(c, "keep", "running"), what="keep running")
        await c.wait_for(lambda: _state(c, "fail", "completed"), what="fail completed")
        running = {t.name for t in await c.client.tasks.list("wi", JOB, state="running")}
        completed = {t.name for t in await c.client.tasks.list("wi", JOB, state="completed")}
        assert (running, completed) == ({"long", "keep"}, {"env", "fail"})
        assert await c.client.tasks.list("wi", JOB, state="active") == []
        counts = await c.client.jobs.task_counts("wi", JOB)
        assert (
            counts.active,
            counts.running,
            counts.completed,
            counts.succeeded,
            counts.failed,
        ) == (0, 2, 2, 1, 1)
        with pytest.raises(BatchError) as e:
            await c.client.tasks.list("wi", JOB, state="sleeping")
        assert e.value.status == 400

        # Terminate: the running tree is killed; the task completes with a failure, not retried.
        await c.wait_for(lambda: _marked_pids(mark), what="long's processes")
        await c.client.tasks.terminate("wi", JOB, "long")
        t = await c.client.tasks.get("wi", JOB, "long")
        assert t.state == "completed"
        assert t.execution_info.scheduling_error.code == "TaskEnded"
        await c.wait_for(lambda: not _marked_pids(mark), timeout=20, what="long's processes gone")
        t = await c.client.tasks.get("wi", JOB, "long")
        assert (t.state, t.execution_info.retry_count) == ("completed", 0)
        assert t.execution_info.exit_code != 0
        counts = await c.client.jobs.task_counts("wi", JOB)
        assert (counts.running, counts.completed, counts.failed) == (1, 3, 2)

        # Delete: the task is gone and its directory removed on the TVM (a running one is killed).
        task_root = os.path.join(c.agents[0].root, "tasks", "wi", JOB)
        assert _exists(os.path.join(task_root, "env"))
        await c.client.tasks.delete("wi", JOB, "env")
        await c.client.tasks.delete("wi", JOB, "keep")
        for name in ("env", "keep"):
            with pytest.raises(BatchError) as e:
                await c.client.tasks.get("wi", JOB, name)
            assert e.value.status == 404
        await c.wait_for(
            lambda: (
                not _exists(os.path.join(task_root, "env"))
                and not _exists(os.path.join(task_root, "keep"))
            ),
            what="task dirs removed",
        )
        tvm = (await c.client.tvms.list("p"))[0]
        await c.wait_for(lambda: _idle(c), what="TVM idle after delete")
        assert {t.name for t in await c.client.tasks.list("wi", JOB)} == {"fail", "long"}
        counts = await c.client.jobs.task_counts("wi", JOB)
        assert (counts.active, counts.running, counts.completed) == (0, 0, 2)
        assert tvm.name


async def _idle(c):
    return [t.state for t in await c.client.tvms.list("p")] == ["idle"]
