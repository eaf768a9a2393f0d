"""Autoscale on the Azure routes over real HTTP (an in-process coordinator with real agents): the
modern variable names, the results string in Azure's exact form, `autoScaleRun` on the pool, and
enable / evaluate / disable with their refusals."""

from __future__ import annotations

import pytest
import trio

from tests.azure.wire import AV, azure_err, pool_body
from tests.integration.test_rest_bad_input import Raw, raw_cluster

# Every modern name read (sample counts are never negative: each comparison is 1).
NAMES = (
    "seen = ($ActiveTasks.Count() + $RunningTasks.Count() + $PendingTasks.Count()"
    " + $SucceededTasks.Count() + $FailedTasks.Count() + $CPUPercent.Count()"
    " + $MemoryBytes.Count() + $DiskBytes.Count() + $NetworkInBytes.Count()"
    " + $NetworkOutBytes.Count() + $WallClockSeconds.Count() + $SampleNodeCount.Count()) >= 0;"
)


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path, agents=2) as (_, raw):
        yield raw


async def _pool(api: Raw, pool: str) -> dict:
    r = await api("GET", f"/pools/{pool}", query=AV)
    assert r.status_code == 200, r.text
    return r.json()


async def test_enable_evaluate_disable_with_modern_names(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("as"), query=AV)).status_code == 201
    # Evaluating needs autoscale on, as on Azure.
    r = await api(
        "POST",
        "/pools/as/evaluateautoscale",
        {"autoScaleFormula": "$TargetDedicatedNodes=1"},
        query=AV,
    )
    azure_err(r, 409, "OperationInvalidForCurrentState")
    formula = (
        "$TargetDedicatedNodes = min(2, $TaskSlotsPerNode * 2);"
        " $NodeDeallocationOption = taskcompletion; slots = $TaskSlotsPerNode;"
    )
    body = {"autoScaleFormula": formula, "autoScaleEvaluationInterval": "PT05M00S"}
    r = await api("POST", "/pools/as/enableautoscale", body, query=AV)
    assert r.status_code == 200, r.text
    pool = await _pool(api, "as")
    assert pool["enableAutoScale"] is True
    assert pool["autoScaleEvaluationInterval"] == "PT5M"
    run = pool["autoScaleRun"]
    assert run["results"] == (
        "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;"
        "$NodeDeallocationOption=taskcompletion;slots=1"
    )
    assert run["timestamp"]
    assert "error" not in run
    assert pool["targetDedicatedNodes"] == 2
    for _ in range(300):
        pool = await _pool(api, "as")
        if pool["currentDedicatedNodes"] == 2:
            break
        await trio.sleep(0.05)
    assert pool["currentDedicatedNodes"] == 2
    # Evaluate: the current nodes, the low-priority target (always 0) and every sample series.
    ev = {
        "autoScaleFormula": "$TargetDedicatedNodes = $CurrentDedicatedNodes + $TargetLowPriorityNodes"
        " + $CurrentLowPriorityNodes; " + NAMES
    }
    r = await api("POST", "/pools/as/evaluateautoscale", ev, query=AV)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == (
        "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;$NodeDeallocationOption=requeue;seen=1"
    )
    assert r.json()["odata.metadata"].endswith("AutoScaleRun")
    # A formula that does not parse is a 400 naming the property; a run-time failure is an
    # autoScaleRun error.
    r = await api(
        "POST",
        "/pools/as/evaluateautoscale",
        {"autoScaleFormula": "$TargetDedicatedNodes=("},
        query=AV,
    )
    azure_err(r, 400, r.json()["code"], "autoScaleFormula")
    r = await api(
        "POST",
        "/pools/as/evaluateautoscale",
        {"autoScaleFormula": "$TargetDedicatedNodes = avg($CPUPercent.GetSample(1));"},
        query=AV,
    )
    assert r.status_code == 200, r.text
    assert r.json()["error"]["code"]
    assert (await _pool(api, "as"))["targetDedicatedNodes"] == 2  # evaluate changes nothing
    # Disable: targets stay at their last values.
    assert (await api("POST", "/pools/as/disableautoscale", query=AV)).status_code == 200
    pool = await _pool(api, "as")
    assert pool["enableAutoScale"] is False
    assert "autoScaleFormula" not in pool
    assert pool["targetDedicatedNodes"] == 2
    # An enable within 30 s of the last is throttled, with nothing changed.
    r = await api(
        "POST",
        "/pools/as/enableautoscale",
        {"autoScaleFormula": "$TargetDedicatedNodes=0"},
        query=AV,
    )
    azure_err(r, 409, "TooManyEnableAutoScaleRequests")
    assert (await _pool(api, "as"))["enableAutoScale"] is False


async def test_enable_refuses_bad_input_and_changes_nothing(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("b"), query=AV)).status_code == 201
    r = await api("POST", "/pools/b/enableautoscale", {}, query=AV)
    azure_err(r, 400, "MissingRequiredProperty", "autoScaleFormula")
    r = await api(
        "POST",
        "/pools/b/enableautoscale",
        {"autoScaleFormula": "$TargetDedicatedNodes=1", "autoScaleEvaluationInterval": "PT1M"},
        query=AV,
    )
    azure_err(r, 400, "InvalidPropertyValue", "autoScaleEvaluationInterval")
    assert (await _pool(api, "b"))["enableAutoScale"] is False
    azure_err(
        await api(
            "POST",
            "/pools/none/enableautoscale",
            {"autoScaleFormula": "$TargetDedicatedNodes=1"},
            query=AV,
        ),
        404,
        "PoolNotFound",
    )
