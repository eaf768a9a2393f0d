"""Issue 5 with real agents: auto pools (made for a workitem's job, released when it ends) and
disable/enable scheduling on a TVM."""

from __future__ import annotations

import json
import shlex

import trio
from click.testing import CliRunner

from coordinator.cli import cli
from coordinator.client import task_spec
from tests.harness import cluster_ctx

JOB = "job-0000000001"


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


async def test_auto_pool_per_job_runs_tasks_and_goes_away(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=2.0) as c:
        spec = {
            "poolLifetimeOption": "job",
            "autoPoolNamePrefix": "ap",
            "pool": {"vmSize": "small", "targetDedicated": 2},
        }
        await c.client.workitems.add("wi", None, auto_pool=spec)
        job = await c.client.jobs.get("wi", JOB)
        pool = job.execution_info.pool_name
        assert pool.startswith("ap-")
        # Tasks go to TVMs as soon as each is ready (never waiting for the whole pool).
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", "/bin/true") for i in range(4)]
        )
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 4
        assert {t.tvm_info.tvm_name for t in await c.client.tasks.list("wi", JOB)} <= {
            t.name for t in await c.client.tvms.list(pool)
        }
        await c.client.workitems.delete("wi")

        async def pool_gone() -> bool:
            return pool not in {p.name for p in await c.client.pools.list()}

        await c.wait_for(pool_gone, what="auto pool deleted with its job")
        # Its agents are free and clean again: a user pool gets both.
        await c.pool_with_tvms("p", 2)


async def test_disable_scheduling_keeps_new_tasks_off(nursery, tmp_path):
    gate = tmp_path / "gate"
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 1)
        (tvm,) = await c.client.tvms.list("p")
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add(
            "wi", JOB, "first", sh(f"while [ ! -e {gate} ]; do sleep 0.05; done")
        )

        async def running() -> bool:
            return (await c.client.tasks.get("wi", JOB, "first")).state == "running"

        await c.wait_for(running, what="first task running")
        await c.client.tvms.disable_scheduling("p", tvm.name, option="taskcompletion")
        await c.client.tasks.add("wi", JOB, "second", "/bin/true")
        gate.write_text("")

        async def offline():  # noqa: ANN202
            t = await c.client.tvms.get("p", tvm.name)
            return t if t.state == "offline" else None

        t = await c.wait_for(offline, what="offline once the running task finished")
        assert t.scheduling_state == "disabled"
        assert (await c.client.tasks.get("wi", JOB, "first")).execution_info.exit_code == 0
        assert (await c.client.tasks.get("wi", JOB, "second")).state == "active"
        env = {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}

        def tvm_cli(*args: str):  # noqa: ANN202
            return CliRunner().invoke(cli, list(args), env=env)

        res = await trio.to_thread.run_sync(tvm_cli, "tvm", "disable-scheduling", "p", tvm.name)
        assert res.exit_code == 1
        assert "TVMAlreadyInTargetSchedulingState" in res.output
        res = await trio.to_thread.run_sync(
            tvm_cli, "tvm", "enable-scheduling", "p", tvm.name, "-o", "json"
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["operation"] == "enable-scheduling"
        counts = await c.client.tasks.wait("wi", JOB, timeout=30)
        assert counts.succeeded == 2
