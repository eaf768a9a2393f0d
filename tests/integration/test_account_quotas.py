"""The account's quotas over HTTP, as Azure Batch has them: `max-pools` (409 PoolQuotaReached) and
`max-active-jobs` (jobs and job schedules not yet completed; 409 ActiveJobAndScheduleQuotaReached).
A real coordinator: the seed client and Microsoft's `azure-batch` 15.1.0 on the Azure routes; a
refused create leaves nothing behind; a restart with a higher limit makes room."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from coordinator.client import BatchError
from tests.azure.sdk15 import ubuntu_pool
from tests.harness import cluster_ctx


def _sdk(rc: object) -> BatchClient:
    return BatchClient(rc.endpoint, AzureNamedKeyCredential(rc.account, rc.key))  # type: ignore[attr-defined]


def _azure_code(call: object) -> tuple[int, str]:
    with pytest.raises(HttpResponseError) as exc:
        call()  # type: ignore[operator]
    assert exc.value.error is not None
    return exc.value.status_code, exc.value.error.code


def _azure_side(rc: object) -> None:
    """(thread) Two pools exist and two jobs/schedules are active: every further create refused."""
    client = _sdk(rc)
    try:
        assert _azure_code(lambda: client.create_pool(ubuntu_pool("az-pool"))) == (
            409,
            "PoolQuotaReached",
        )
        info = bm.BatchPoolInfo(pool_id="p1")
        assert _azure_code(
            lambda: client.create_job(bm.BatchJobCreateOptions(id="az-job", pool_info=info))
        ) == (409, "ActiveJobAndScheduleQuotaReached")
        schedule = bm.BatchJobScheduleCreateOptions(
            id="az-sched",
            schedule=bm.BatchJobScheduleConfiguration(recurrence_interval=dt.timedelta(hours=1)),
            job_specification=bm.BatchJobSpecification(pool_info=info),
        )
        assert _azure_code(lambda: client.create_job_schedule(schedule)) == (
            409,
            "ActiveJobAndScheduleQuotaReached",
        )
        assert sorted(p.id for p in client.list_pools()) == ["p1", "p2"]
    finally:
        client.close()


async def test_pool_and_active_job_quotas(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, max_pools=2, max_active_jobs=2) as c:
        await c.client.pools.add("p1")
        await c.client.pools.add("p2")
        with pytest.raises(BatchError) as exc:
            await c.client.pools.add("p3")
        assert (exc.value.status, exc.value.code) == (409, "PoolQuotaReached")
        assert "max-pools" in exc.value.message
        await c.client.workitems.add("w1", "p1")
        await c.client.workitems.add("w2", "p1")
        with pytest.raises(BatchError) as exc:
            await c.client.workitems.add("w3", "p1")
        assert (exc.value.status, exc.value.code) == (409, "ActiveJobAndScheduleQuotaReached")
        assert "max-active-jobs" in exc.value.message
        await trio.to_thread.run_sync(_azure_side, c.rc)
        core = c.rc.service.core
        assert sorted(core.pools) == ["p1", "p2"]
        assert sorted(core.workitems) == ["w1", "w2"]
        assert sorted(core.jobs) == ["w1/job-0000000001", "w2/job-0000000001"]
        await c.client.workitems.delete("w2")
        await c.client.workitems.add("w3", "p1")
    async with cluster_ctx(nursery, tmp_path, max_pools=3, max_active_jobs=2) as c:
        await c.client.pools.add("p3")
        with pytest.raises(BatchError) as exc:
            await c.client.workitems.add("w4", "p1")
        assert exc.value.code == "ActiveJobAndScheduleQuotaReached"
