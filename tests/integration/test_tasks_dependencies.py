"""Task dependencies over a real coordinator and real agents: dependents start only after their
parents succeeded, a failure blocks (the dependent stays active and says why), an exit condition
can satisfy on failure, bad dependencies are refused with nothing added, and a coordinator restart
keeps waiting dependents waiting."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.client import BatchError, task_spec
from coordinator.common import models as m
from tests.harness import cluster_ctx
from tests.integration.test_cli import _env, tvm

JOB = "job-0000000001"


def _satisfy_on(code: int) -> m.ExitConditions:
    return m.ExitConditions(
        exit_codes=[
            m.ExitCodeMapping(code=code, exit_options=m.ExitOptions(dependency_action="satisfy"))
        ]
    )


async def _task(c: Any, name: str) -> m.Task:
    return await c.client.tasks.get("wi", JOB, name)


async def test_success_failure_blocks_and_satisfy_on_failure(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        await c.pool_with_tvms("p", 2, max_tasks_per_vm=2)
        await c.client.workitems.add("wi", "p", uses_task_dependencies=True)
        specs = [
            task_spec("a", "/bin/sh -c 'sleep 0.5; echo a'"),
            task_spec("b", "/bin/sh -c 'exit 3'"),
            task_spec("d", "/bin/sh -c 'exit 7'", exit_conditions=_satisfy_on(7)),
            task_spec("after_a", "/bin/echo after_a", depends_on=["a"]),
            task_spec("after_b", "/bin/echo after_b", depends_on=["b"]),
            task_spec("after_d", "/bin/echo after_d", depends_on=["d"]),
            task_spec("after_both", "/bin/echo both", depends_on=["after_a", "after_d"]),
        ]
        res = await c.client.tasks.add_collection("wi", JOB, specs)
        assert [r.status for r in res] == ["success"] * len(specs)
        waiting = await _task(c, "after_both")
        assert waiting.state == "active"
        assert waiting.dependency_state == "waiting"
        assert waiting.depends_on is not None
        assert waiting.depends_on.task_ids == ["after_a", "after_d"]

        # The wait ends although after_b never can run: it names the blocked one in the counts.
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert (counts.completed, counts.active, counts.running) == (6, 1, 0)
        assert counts.failed == 2  # b and d (d failed, yet satisfied its dependent)

        for child, parent in (("after_a", "a"), ("after_d", "d"), ("after_both", "after_a")):
            ct, pt = await _task(c, child), await _task(c, parent)
            assert ct.state == "completed"
            assert ct.execution_info.exit_code == 0
            # Started only after its parent had ended.
            assert ct.execution_info.start_time >= pt.execution_info.end_time
        blocked = await _task(c, "after_b")
        assert blocked.state == "active"
        assert blocked.dependency_state == "blocked"
        assert "'b'" in blocked.dependency_reason
        assert "exit code 3" in blocked.dependency_reason
        assert blocked.execution_info.start_time is None

        # The CLI: the list shows the blocked task, the wait names the failures and what they block.
        env = _env(
            {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        )
        r = await tvm("task", "list", "wi", JOB, env=env)
        row = next(x for x in r.stdout.decode().splitlines() if "after_b" in x)
        assert "blocked" in row
        r = await tvm("task", "wait", "wi", JOB, "--timeout", "30", env=env, ok=False)
        assert r.returncode == 1
        out, err = r.stdout.decode(), r.stderr.decode()
        assert "6 completed: 4 succeeded, 2 failed, 1 blocked by failed dependencies" in out
        assert "failed: b: exit code 3" in err
        assert "after_b: dependency 'b' failed with exit code 3" in err
        # Deleting the blocked dependent leaves nothing waiting; a dependent added after its parent
        # succeeded runs at once.
        await c.client.tasks.delete("wi", JOB, "after_b")
        await c.client.tasks.add("wi", JOB, "late", "/bin/true", depends_on=["a"])
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.active == 0
        late = await _task(c, "late")
        assert (late.state, late.execution_info.exit_code) == ("completed", 0)


async def test_bad_dependencies_are_refused_and_nothing_is_added(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.pools.add("p", target_dedicated=0)
        await c.client.workitems.add("wi", "p", uses_task_dependencies=True)
        await c.client.workitems.add("plain", "p")
        await c.client.tasks.add("wi", JOB, "a", "true")

        with pytest.raises(BatchError) as e:
            await c.client.tasks.add("wi", JOB, "x", "true", depends_on=["a", "ghost"])
        assert (e.value.status, e.value.code) == (400, "TaskDependencyNotFound")
        assert "'ghost'" in e.value.message
        with pytest.raises(BatchError) as e:
            await c.client.tasks.add("plain", JOB, "x", "true", depends_on=["a"])
        assert e.value.code == "TaskDependenciesNotSpecifiedOnJob"
        bad_range = m.TaskDependencies(task_id_ranges=[m.TaskIdRange(start=9, end=2)])
        with pytest.raises(BatchError) as e:
            await c.client.tasks.add("wi", JOB, "x", "true", depends_on=bad_range)
        assert e.value.code == "InvalidPropertyValue"

        res = await c.client.tasks.add_collection(
            "wi",
            JOB,
            [
                task_spec("c1", "true", depends_on=["c2"]),
                task_spec("c2", "true", depends_on=["c1"]),
                task_spec("ok", "true", depends_on=["a"]),
            ],
        )
        got = {r.name: (r.status, (r.error or {}).get("code")) for r in res}
        assert got == {
            "c1": ("clienterror", "TaskDependencyCycle"),
            "c2": ("clienterror", "TaskDependencyCycle"),
            "ok": ("success", None),
        }
        names = sorted(t.name for t in await c.client.tasks.list("wi", JOB))
        assert names == ["a", "ok"]


async def test_a_restart_keeps_waiting_and_blocked_dependents(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p", uses_task_dependencies=True)
        await c.client.tasks.add("wi", JOB, "bad", "/bin/sh -c 'exit 2'")
        await c.client.tasks.wait("wi", JOB, timeout=30)
        # No TVM left: what is added now waits through the restart.
        await c.client.pools.resize("p", 0)
        await c.wait_for(lambda: _no_tvms(c), what="the pool empty")
        await c.client.tasks.add_collection(
            "wi",
            JOB,
            [
                task_spec("a", "/bin/echo a"),
                task_spec("w", "/bin/echo w", depends_on=["a"]),
                task_spec("blk", "/bin/echo blk", depends_on=["bad"]),
            ],
        )
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        blk = await _task(c, "blk")
        assert (blk.state, blk.dependency_state) == ("active", "blocked")
        w = await _task(c, "w")
        assert (w.state, w.dependency_state) == ("active", "waiting")
        await c.client.pools.resize("p", 1)
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert (counts.completed, counts.active) == (3, 1)
        a, w = await _task(c, "a"), await _task(c, "w")
        assert w.execution_info.exit_code == 0
        assert w.execution_info.start_time >= a.execution_info.end_time
        assert (await _task(c, "blk")).dependency_state == "blocked"


async def _no_tvms(c: Any) -> bool:
    return not await c.client.tvms.list("p")
