"""max-tasks bounds the tasks of all jobs together, as max-tasks-per-job bounds one job's: a tenant
(or a job manager's credential in each of many jobs) cannot grow the coordinator's memory by
spreading tasks over jobs. A real coordinator over HTTP: the seed client, the Azure route through
Microsoft's `azure-batch` 15.1.0, a restart that counts what the store holds."""

from __future__ import annotations

import pytest
import trio
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from coordinator.client import BatchError
from coordinator.common import models as m
from tests.harness import cluster_ctx

JOB = "job-0000000001"


def _azure_add(endpoint: str, account: str, key: str, job: str, task: str) -> None:
    client = BatchClient(endpoint, AzureNamedKeyCredential(account, key))
    try:
        client.create_task(job, bm.BatchTaskCreateOptions(id=task, command_line="/bin/true"))
    finally:
        client.close()


async def test_tasks_of_all_jobs_together_stop_at_max_tasks(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0, max_tasks=5) as c:
        for wi in ("a", "b", "c"):
            await c.client.workitems.add(wi, "p")
        await c.client.tasks.add("a", JOB, "a1", "/bin/true")
        await c.client.tasks.add("a", JOB, "a2", "/bin/true")
        results = await c.client.tasks.add_collection(
            "b",
            JOB,
            [m.TaskAdd(name=n, command_line="/bin/true") for n in ("b1", "b2", "b3", "b4")],
        )
        assert [r.status for r in results] == ["success", "success", "success", "clienterror"]
        with pytest.raises(BatchError) as exc:
            await c.client.tasks.add("c", JOB, "c1", "/bin/true")
        assert (exc.value.status, exc.value.code) == (409, "TaskQuotaReached")
        assert "max-tasks" in exc.value.message
        rc = c.rc
        with pytest.raises(HttpResponseError) as az:
            await trio.to_thread.run_sync(_azure_add, rc.endpoint, rc.account, rc.key, "c", "c2")
        assert az.value.status_code == 409
        assert az.value.error is not None
        assert az.value.error.code == "TaskQuotaReached"
        core = rc.service.core
        assert sorted(core.get_job("c", JOB).tasks) == []  # nothing of the refused adds
        await c.client.tasks.delete("a", JOB, "a1")  # room for one
        await c.client.tasks.add("c", JOB, "c1", "/bin/true")
    # A restart counts what the store holds: still full at 5, room for two more at 7.
    async with cluster_ctx(nursery, tmp_path, agents=0, max_tasks=5) as c:
        with pytest.raises(BatchError) as exc:
            await c.client.tasks.add("c", JOB, "c2", "/bin/true")
        assert exc.value.code == "TaskQuotaReached"
    async with cluster_ctx(nursery, tmp_path, agents=0, max_tasks=7) as c:
        await c.client.tasks.add("c", JOB, "c2", "/bin/true")
        await c.client.workitems.delete("b")  # its job's three tasks go with it
        for n in ("c3", "c4", "c5", "c6"):
            await c.client.tasks.add("c", JOB, n, "/bin/true")
        with pytest.raises(BatchError):
            await c.client.tasks.add("c", JOB, "c7", "/bin/true")
