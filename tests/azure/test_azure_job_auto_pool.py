"""A job (not a schedule's) with `poolInfo.autoPoolSpecification` on the Azure routes, over real HTTP
(an in-process coordinator with one agent): the pool is made with the job, named from
`autoPoolIdPrefix`, runs the job's task, is shown as the job's `executionInfo.poolId` while
`poolInfo` echoes the specification, may be repeated on an update but not changed, and goes when
the job ends. Bad specifications are refused naming the property, with nothing left behind."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.azure.wire import AV, IMAGE, azure_err
from tests.integration.test_rest_bad_input import Raw, raw_cluster


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path, agents=1) as (_, raw):
        yield raw


AUTO = "poolInfo.autoPoolSpecification."


def _auto(lifetime: str = "job", **extra: Any) -> dict[str, Any]:
    return {
        "autoPoolIdPrefix": "render",
        "poolLifetimeOption": lifetime,
        "keepAlive": False,
        "pool": {
            "vmSize": "Standard_D2s_v3",
            "virtualMachineConfiguration": dict(IMAGE),
            "targetDedicatedNodes": 1,
            **extra,
        },
    }


async def _pools(api: Raw) -> list[str]:
    r = await api("GET", "/pools", query=AV)
    assert r.status_code == 200, r.text
    return [p["id"] for p in r.json()["value"]]


async def _until(what: str, check: Any) -> Any:
    for _ in range(400):
        value = await check()
        if value:
            return value
        await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_job_with_an_auto_pool(api: Raw) -> None:
    body = {"id": "aj", "poolInfo": {"autoPoolSpecification": _auto()}}
    r = await api("POST", "/jobs", body, query=AV)
    assert r.status_code == 201, r.text
    job = (await api("GET", "/jobs/aj", query=AV)).json()
    assert job["poolInfo"]["autoPoolSpecification"]["autoPoolIdPrefix"] == "render"
    assert job["poolInfo"]["autoPoolSpecification"]["poolLifetimeOption"] == "job"
    pool_id = job["executionInfo"]["poolId"]
    assert pool_id.startswith("render-")
    assert pool_id in await _pools(api)

    # Its task runs on the auto pool's node.
    task = {"id": "t1", "commandLine": "/bin/sh -c 'echo on-auto-pool'"}
    assert (await api("POST", "/jobs/aj/tasks", task, query=AV)).status_code == 201

    async def done() -> Any:
        t = (await api("GET", "/jobs/aj/tasks/t1", query=AV)).json()
        return t if t["state"] == "completed" else None

    t = await _until("the task on the auto pool", done)
    assert t["executionInfo"]["exitCode"] == 0
    assert t["nodeInfo"]["poolId"] == pool_id

    # An update may repeat the specification (read, change, write back), not change the pool.
    patch = {"priority": 5, "poolInfo": job["poolInfo"]}
    r = await api("PATCH", "/jobs/aj", patch, query=AV)
    assert r.status_code == 200, r.text
    assert (await api("GET", "/jobs/aj", query=AV)).json()["priority"] == 5
    r = await api("PATCH", "/jobs/aj", {"poolInfo": {"poolId": "elsewhere"}}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "poolInfo")

    # Lifetime job: the pool goes when the job ends.
    assert (await api("POST", "/jobs/aj/terminate", query=AV)).status_code == 202

    async def gone() -> bool:
        return pool_id not in await _pools(api)

    await _until("the auto pool's removal", gone)
    job = (await api("GET", "/jobs/aj", query=AV)).json()
    assert job["state"] == "completed"
    assert job["executionInfo"]["poolId"] == pool_id


@pytest.mark.parametrize(
    ("pool_info", "prop"),
    [
        ({"autoPoolSpecification": _auto("jobschedule")}, AUTO + "poolLifetimeOption"),
        ({"autoPoolSpecification": _auto("forever")}, AUTO + "poolLifetimeOption"),
        ({"poolId": "p", "autoPoolSpecification": _auto()}, "poolInfo.poolId"),
        ({"autoPoolSpecification": {**_auto(), "pool": None}}, AUTO + "pool"),
        ({"autoPoolSpecification": _auto(id="named")}, AUTO + "pool.id"),
        ({"autoPoolSpecification": _auto(vmSize="no_such_size")}, AUTO + "pool.vmSize"),
        (
            {"autoPoolSpecification": _auto(cloudServiceConfiguration={"osFamily": "6"})},
            AUTO + "pool.cloudServiceConfiguration",
        ),
    ],
)
async def test_bad_auto_pool_refused_with_nothing_left(
    api: Raw, pool_info: dict[str, Any], prop: str
) -> None:
    r = await api("POST", "/jobs", {"id": "bad", "poolInfo": pool_info}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", prop)
    assert await _pools(api) == []
    azure_err(await api("GET", "/jobs/bad", query=AV), 404, "JobNotFound")
