"""Issue 7 end to end: a formula scales a pool of real agents 0 -> 3 -> 0 as pending tasks come and go.

The coordinator runs with short autoscale timings (`run_coordinator(autoscale_timing=...)`): samples
every 0.2 s and formula runs every second stand in for 30-s samples and 5-minute intervals.
"""

from __future__ import annotations

import json
import sys

import pytest
import trio
from click.testing import CliRunner

from coordinator.cli import cli
from coordinator.client import BatchError, task_spec
from coordinator.core import AutoscaleTiming
from tests.harness import cluster_ctx

FAST = AutoscaleTiming(
    sample_period=0.2, visibility_delay=0.4, min_interval=1.0, enable_throttle=0.0
)
PENDING = """
// one TVM per pending task, at most 3; leaving TVMs finish their tasks first
$tasks = max(0, $PendingTasks.GetSample(1));
$TargetDedicatedNodes = min($tasks, 3);
$NodeDeallocationOption = taskcompletion;
"""
JOB = "job-0000000001"


async def _size(c, pool: str) -> int:
    return len(await c.client.tvms.list(pool))


async def test_pending_tasks_scale_a_pool_from_zero_to_three_and_back(nursery, tmp_path):
    async with cluster_ctx(
        nursery, tmp_path, agents=3, heartbeat_timeout=3.0, autoscale_timing=FAST
    ) as c:
        p = await c.client.pools.add(
            "auto",
            enable_auto_scale=True,
            auto_scale_formula=PENDING,
            auto_scale_evaluation_interval="PT1S",
        )
        assert p.enable_auto_scale
        assert p.auto_scale_evaluation_interval == "PT1S"
        assert p.target_dedicated == 0
        assert p.auto_scale_run is not None
        assert p.auto_scale_run.error is None
        assert (
            p.auto_scale_run.results
            == "$TargetDedicatedNodes=0;$NodeDeallocationOption=taskcompletion;$tasks=0"
        )
        await c.wait_for(
            lambda: _run_after(c, p.auto_scale_run.timestamp), what="a second periodic run"
        )
        assert await _size(c, "auto") == 0

        # manual resize is refused while autoscale is on
        with pytest.raises(BatchError) as info:
            await c.client.pools.resize("auto", 2)
        assert (info.value.status, info.value.code) == (409, "AutoScaleEnabled")

        gate = tmp_path / "go"
        await c.client.workitems.add("wi", "auto")
        cmd = f'{sys.executable} -c "import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)"'
        await c.client.tasks.add_many("wi", JOB, [task_spec(f"t{i}", cmd) for i in range(6)])
        await c.wait_for(
            lambda: _pool_is(c, "auto", target=3, idle_or_running=3),
            timeout=30,
            what="the pool to grow to 3 TVMs",
        )
        await c.wait_for(lambda: _running(c, 3), timeout=30, what="3 tasks running")
        pool = await c.client.pools.get("auto")
        assert pool.auto_scale_run.results.startswith("$TargetDedicatedNodes=3;")
        # the agents' heartbeats feed the resource series
        await c.wait_for(lambda: _resource_samples(c), what="resource samples from heartbeats")

        gate.write_text("go")
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert counts.completed == 6
        assert counts.failed == 0
        await c.wait_for(
            lambda: _pool_is(c, "auto", target=0, idle_or_running=0, total=0),
            timeout=30,
            what="the pool to shrink to 0 TVMs",
        )
        for t in await c.client.tasks.list("wi", JOB):
            assert t.state == "completed"
            assert t.execution_info.requeue_count == 0

        # evaluate: answers without applying anything
        run = await c.client.pools.evaluate_autoscale(
            "auto", "$TargetDedicatedNodes = 2; $x = 1 + 1;"
        )
        assert (run.results, run.error) == (
            "$TargetDedicatedNodes=2;$NodeDeallocationOption=requeue;$x=2",
            None,
        )
        run = await c.client.pools.evaluate_autoscale(
            "auto", "$TargetDedicatedNodes = avg($CPUPercent.GetSample(TimeInterval_Hour, 100));"
        )
        assert run.results == ""
        assert run.error.code == "InsufficientSampleData"
        assert "line 1, column" in run.error.message
        await trio.sleep(1.5)
        assert (await c.client.pools.get("auto")).target_dedicated == 0

        # disable: the target stays, manual resize works again
        await c.client.pools.disable_autoscale("auto")
        pool = await c.client.pools.get("auto")
        assert not pool.enable_auto_scale
        assert pool.auto_scale_formula is None
        assert pool.target_dedicated == 0
        await c.client.pools.resize("auto", 1)
        await c.wait_for(
            lambda: _pool_is(c, "auto", target=1, idle_or_running=1), what="manual resize to 1"
        )


async def _run_after(c, timestamp: str) -> bool:
    run = (await c.client.pools.get("auto")).auto_scale_run
    return run is not None and run.timestamp > timestamp


async def _pool_is(
    c, pool: str, *, target: int, idle_or_running: int, total: int | None = None
) -> bool:
    p = await c.client.pools.get(pool)
    tvms = await c.client.tvms.list(pool)
    ok = sum(1 for t in tvms if t.state in ("idle", "running")) == idle_or_running
    return p.target_dedicated == target and ok and (total is None or len(tvms) == total)


async def _resource_samples(c) -> bool:
    run = await c.client.pools.evaluate_autoscale(
        "auto",
        "$cpu = $CPUPercent.Count(); $mem = max($MemoryBytes.GetSample(1)); $nodes = max($SampleNodeCount.GetSample(1));",
    )
    if run.error is not None:  # no sample yet: GetSample(1) of an empty history fails
        return False
    values = dict(part.split("=", 1) for part in run.results.split(";"))
    return float(values["$cpu"]) > 0 and float(values["$mem"]) > 0 and values["$nodes"] == "3"


async def _running(c, n: int) -> bool:
    return len(await c.client.tasks.list("wi", JOB, state="running")) == n


async def test_bad_formulas_and_settings_are_refused_with_nothing_stored(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0, autoscale_timing=FAST) as c:
        with pytest.raises(BatchError) as info:
            await c.client.pools.add(
                "bad",
                enable_auto_scale=True,
                auto_scale_formula="$a = 1;\n$TargetDedicatedNodes = max($a,;",
            )
        assert (info.value.status, info.value.code) == (400, "AutoScalingFormulaSyntaxError")
        assert "line 2, column" in info.value.message
        with pytest.raises(BatchError) as info:
            await c.client.pools.add(
                "bad",
                enable_auto_scale=True,
                auto_scale_formula="$TargetDedicatedNodes=1",
                auto_scale_evaluation_interval="P8D",
            )
        assert (info.value.status, info.value.code) == (400, "InvalidPropertyValue")
        with pytest.raises(BatchError) as info:
            await c.client.pools.add("bad", enable_auto_scale=True, auto_scale_formula="x" * 9000)
        assert (info.value.status, info.value.code) == (400, "AutoScaleFormulaTooLong")
        assert [p.name for p in await c.client.pools.list()] == []

        await c.client.pools.add("manual")
        with pytest.raises(BatchError) as info:
            await c.client.pools.enable_autoscale("manual", "$TargetDedicatedNodes = (")
        assert (info.value.status, info.value.code) == (400, "AutoScalingFormulaSyntaxError")
        with pytest.raises(BatchError) as info:
            await c.client.pools.enable_autoscale("manual")
        assert (info.value.status, info.value.code) == (400, "MissingRequiredProperty")
        with pytest.raises(BatchError) as info:
            await c.client.pools.evaluate_autoscale("manual", "$TargetDedicatedNodes = 1")
        assert info.value.status == 409
        with pytest.raises(BatchError) as info:
            await c.client.pools.enable_autoscale("nope", "$TargetDedicatedNodes = 1")
        assert (info.value.status, info.value.code) == (404, "PoolNotFound")
        pool = await c.client.pools.get("manual")
        assert not pool.enable_auto_scale
        assert pool.auto_scale_run is None

        # a runtime failure is reported on the pool and changes nothing
        await c.client.pools.enable_autoscale(
            "manual", "$TargetDedicatedNodes = $never_set;", evaluation_interval="PT1S"
        )
        pool = await c.client.pools.get("manual")
        assert pool.enable_auto_scale
        assert pool.target_dedicated == 0
        assert pool.auto_scale_run.error.code == "AutoScalingFormulaEvaluationError"
        assert "$never_set" in pool.auto_scale_run.error.message

        # the CLI drives the same endpoints
        env = {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}

        def cli_run(*args: str):
            return CliRunner().invoke(cli, list(args), env=env)

        res = await trio.to_thread.run_sync(
            cli_run,
            "pool",
            "autoscale",
            "evaluate",
            "manual",
            "--formula",
            "$TargetDedicatedNodes = 4;",
            "-o",
            "json",
        )
        assert res.exit_code == 0, res.output
        assert (
            json.loads(res.output)["results"]
            == "$TargetDedicatedNodes=4;$NodeDeallocationOption=requeue"
        )
        res = await trio.to_thread.run_sync(
            cli_run,
            "pool",
            "autoscale",
            "enable",
            "manual",
            "--formula",
            "$TargetDedicatedNodes = 2;",
        )
        assert res.exit_code == 0, res.output
        assert (await c.client.pools.get("manual")).target_dedicated == 2
        res = await trio.to_thread.run_sync(
            cli_run, "pool", "autoscale", "enable", "manual", "--formula", "$x = ("
        )
        assert res.exit_code == 1
        assert "AutoScalingFormulaSyntaxError" in res.output
        res = await trio.to_thread.run_sync(cli_run, "pool", "autoscale", "disable", "manual")
        assert res.exit_code == 0, res.output
        assert not (await c.client.pools.get("manual")).enable_auto_scale
