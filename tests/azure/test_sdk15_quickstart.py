"""Microsoft's `azure-batch` 15.1.0 (`BatchClient`, api-version 2025-06-01), unmodified, against a
real `tvm up`: the quickstart flow, paging by next links, `$filter`, `service_timeout`,
`pool_exists`, duplicate creates and a conditional update refused with 412."""

from __future__ import annotations

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError

from tests.azure import sdk15
from tests.azure.sdk15 import idle_nodes, ubuntu_pool, uid, wait

CMD = "/bin/sh -c 'echo hello $AZ_BATCH_TASK_ID'"


up = sdk15.up_fixture(2)
client = sdk15.client_fixture()


def test_quickstart(client: BatchClient) -> None:
    pool_id, job_id = uid("qs-pool"), uid("qs-job")
    client.create_pool(ubuntu_pool(pool_id, 2))
    pool = client.get_pool(pool_id)
    assert pool.vm_size == "standard_d2s_v3"
    assert pool.virtual_machine_configuration is not None
    assert pool.virtual_machine_configuration.node_agent_sku_id == "batch.node.ubuntu 22.04"

    nodes = idle_nodes(client, pool_id, 2, "two idle nodes")
    node_ids = {n.id for n in nodes}

    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )
    tasks = [bm.BatchTaskCreateOptions(id=f"task{i}", command_line=CMD) for i in range(10)]
    result = client.create_tasks(job_id, tasks)
    assert sorted(r.task_id for r in result.result_values or []) == sorted(t.id for t in tasks)
    assert {r.status for r in result.result_values or []} == {bm.BatchTaskAddStatus.SUCCESS}

    def all_done() -> list[bm.BatchTask] | None:
        listed = list(client.list_tasks(job_id))
        return listed if all(t.state == bm.BatchTaskState.COMPLETED for t in listed) else None

    done = wait(all_done, "ten completed tasks")
    assert len(done) == 10
    for t in done:
        assert t.execution_info is not None
        assert t.execution_info.result == bm.BatchTaskExecutionResult.SUCCESS
        assert t.execution_info.exit_code == 0
        info = t.node_info
        assert info is not None
        assert info.pool_id == pool_id
        assert info.node_id in node_ids
        assert info.node_url is not None
        assert info.node_url.endswith(f"/pools/{pool_id}/nodes/{info.node_id}")
        out = b"".join(client.download_task_file(job_id, t.id, "stdout.txt"))
        assert out.decode().strip() == f"hello {t.id}"
    props = client.get_task_file_properties(job_id, done[0].id, "stdout.txt")
    assert props.content_length == len(f"hello {done[0].id}\n")
    assert props.is_directory is False
    ok = list(client.list_tasks(job_id, filter="executionInfo/result eq 'success'"))
    assert len(ok) == 10
    assert list(client.list_tasks(job_id, filter="executionInfo/exitCode ne 0")) == []
    counts = client.get_job_task_counts(job_id)
    assert counts.task_counts.succeeded == 10
    assert counts.task_counts.failed == 0

    client.begin_delete_job(job_id, polling_interval=1).result()
    client.begin_delete_pool(pool_id, polling_interval=1).result()
    assert job_id not in {j.id for j in client.list_jobs()}
    assert pool_id not in {p.id for p in client.list_pools()}


def test_paging_filter_and_timeout(client: BatchClient) -> None:
    pool_id = uid("pg-pool")
    prefix = uid("pg")
    client.create_pool(ubuntu_pool(pool_id, 0))
    ids = [f"{prefix}-{i}" for i in range(3)]
    try:
        for jid in ids:
            client.create_job(
                bm.BatchJobCreateOptions(id=jid, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
            )
        # One job per page: the client follows each absolute odata.nextLink.
        pages = list(client.list_jobs(max_results=1).by_page())
        assert len(pages) >= 3
        seen = [j.id for p in pages for j in p]
        assert all(len(list(p)) <= 1 for p in client.list_jobs(max_results=1).by_page())
        assert [j for j in seen if j.startswith(prefix)] == ids
        # $filter (and $select) are evaluated by the service.
        mine = list(client.list_jobs(filter=f"startswith(id, '{prefix}') and state eq 'active'"))
        assert sorted(j.id for j in mine) == ids
        one = list(client.list_jobs(filter=f"id eq '{ids[1]}'", select=["id", "state"]))
        assert [(j.id, j.state) for j in one] == [(ids[1], bm.BatchJobState.ACTIVE)]
        assert one[0].pool_info is None  # not selected
        # service_timeout travels as timeOut and is accepted.
        assert client.get_pool(pool_id, service_timeout=30).id == pool_id
        assert client.pool_exists(pool_id, service_timeout=10) is True
    finally:
        for jid in ids:
            client.begin_delete_job(jid, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_duplicates_raise_exists_errors(client: BatchClient) -> None:
    pool_id, job_id = uid("dup-pool"), uid("dup-job")
    client.create_pool(ubuntu_pool(pool_id, 0))
    try:
        with pytest.raises(ResourceExistsError) as exc:
            client.create_pool(ubuntu_pool(pool_id, 0))
        assert exc.value.error is not None
        assert exc.value.error.code == "PoolExists"
        client.create_job(
            bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
        )
        with pytest.raises(ResourceExistsError) as exc:
            client.create_job(
                bm.BatchJobCreateOptions(
                    id=job_id.upper(), pool_info=bm.BatchPoolInfo(pool_id=pool_id)
                )
            )
        assert exc.value.error is not None
        assert exc.value.error.code == "JobExists"
        client.create_task(job_id, bm.BatchTaskCreateOptions(id="t1", command_line="true"))
        with pytest.raises(ResourceExistsError) as exc:
            client.create_task(job_id, bm.BatchTaskCreateOptions(id="t1", command_line="true"))
        assert exc.value.error is not None
        assert exc.value.error.code == "TaskExists"
        assert [t.id for t in client.list_tasks(job_id)] == ["t1"]
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_conditional_update_refused_with_412(client: BatchClient) -> None:
    pool_id = uid("etag-pool")
    client.create_pool(ubuntu_pool(pool_id, 0))
    try:
        old = client.get_pool(pool_id)
        assert old.etag
        update = bm.BatchPoolUpdateOptions(metadata=[bm.BatchMetadataItem(name="k", value="1")])
        client.update_pool(
            pool_id, update, etag=old.etag, match_condition=MatchConditions.IfNotModified
        )
        new = client.get_pool(pool_id)
        assert new.etag != old.etag
        assert [(x.name, x.value) for x in new.metadata or []] == [("k", "1")]
        stale = bm.BatchPoolUpdateOptions(metadata=[bm.BatchMetadataItem(name="k", value="2")])
        with pytest.raises(ResourceModifiedError) as exc:
            client.update_pool(
                pool_id, stale, etag=old.etag, match_condition=MatchConditions.IfNotModified
            )
        assert exc.value.status_code == 412
        assert exc.value.error is not None
        assert exc.value.error.code == "ConditionNotMet"
        after = client.get_pool(pool_id)
        assert [(x.name, x.value) for x in after.metadata or []] == [("k", "1")]
        assert after.etag == new.etag
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_job_with_an_auto_pool(client: BatchClient) -> None:
    """A job whose pool is made for it (`poolInfo.auto_pool_specification`, lifetime job): its
    task runs there, the job reads back as it was given, the pool goes when the job ends."""
    job_id = uid("auto-job")
    template = ubuntu_pool("unused", 1)
    spec = bm.BatchPoolSpecification(
        vm_size=template.vm_size,
        virtual_machine_configuration=template.virtual_machine_configuration,
        target_dedicated_nodes=1,
    )
    auto = bm.BatchAutoPoolSpecification(
        auto_pool_id_prefix="qsauto",
        pool_lifetime_option=bm.BatchPoolLifetimeOption.JOB,
        pool=spec,
    )
    client.create_job(
        bm.BatchJobCreateOptions(
            id=job_id, pool_info=bm.BatchPoolInfo(auto_pool_specification=auto)
        )
    )
    job = client.get_job(job_id)
    assert job.pool_info.auto_pool_specification is not None
    assert job.pool_info.auto_pool_specification.auto_pool_id_prefix == "qsauto"
    assert job.execution_info is not None
    pool_id = job.execution_info.pool_id
    assert pool_id is not None
    assert pool_id.startswith("qsauto")
    client.create_task(job_id, bm.BatchTaskCreateOptions(id="t", command_line=CMD))
    task = wait(
        lambda: (t := client.get_task(job_id, "t")).state == bm.BatchTaskState.COMPLETED and t,
        "the task on the auto pool",
    )
    assert task.execution_info is not None
    assert task.execution_info.exit_code == 0
    assert task.node_info is not None
    assert task.node_info.pool_id == pool_id
    # (Without options the SDK fails before sending: no content type for an empty body.)
    client.begin_terminate_job(
        job_id, BatchJobTerminateOptions(termination_reason="done"), polling_interval=1
    ).result()
    wait(lambda: pool_id not in {p.id for p in client.list_pools()}, "the auto pool's removal")
    client.begin_delete_job(job_id, polling_interval=1).result()


def test_max_parallel_tasks(client: BatchClient) -> None:
    """A job's `max_parallel_tasks` holds it to that many running tasks with slots to spare (two
    nodes here): with 1, its tasks never overlap; an update changes it."""
    pool_id, job_id = uid("mp-pool"), uid("mp-job")
    client.create_pool(ubuntu_pool(pool_id, 2))
    try:
        idle_nodes(client, pool_id, 2, "two idle nodes")
        client.create_job(
            bm.BatchJobCreateOptions(
                id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id), max_parallel_tasks=1
            )
        )
        assert client.get_job(job_id).max_parallel_tasks == 1
        tasks = [
            bm.BatchTaskCreateOptions(id=f"t{i}", command_line="/bin/sh -c 'sleep 0.3'")
            for i in range(4)
        ]
        client.create_tasks(job_id, tasks)

        def all_done() -> list[bm.BatchTask] | None:
            listed = list(client.list_tasks(job_id))
            return listed if all(t.state == bm.BatchTaskState.COMPLETED for t in listed) else None

        runs = []
        for t in wait(all_done, "four tasks one at a time"):
            info = t.execution_info
            assert info is not None
            assert info.exit_code == 0
            runs.append((info.start_time, info.end_time))
        runs.sort()
        for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
            assert start >= end, runs  # the next started after the last ended
        client.update_job(job_id, bm.BatchJobUpdateOptions(max_parallel_tasks=2))
        assert client.get_job(job_id).max_parallel_tasks == 2
        with pytest.raises(HttpResponseError) as exc:
            client.update_job(job_id, bm.BatchJobUpdateOptions(max_parallel_tasks=0))
        assert exc.value.error is not None
        assert exc.value.error.code == "InvalidPropertyValue"
        assert client.get_job(job_id).max_parallel_tasks == 2
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_task_affinity(client: BatchClient) -> None:
    """`affinity_info` with a node's `affinity_id`: the task runs on that node while it has a
    free slot (a hint, as in Azure), and reads back as given."""
    pool_id, job_id = uid("af-pool"), uid("af-job")
    client.create_pool(ubuntu_pool(pool_id, 2))
    try:
        nodes = sorted(idle_nodes(client, pool_id, 2, "two idle nodes"), key=lambda n: n.id)
        target = nodes[-1]  # not the node tasks are dealt to first
        assert target.affinity_id is not None
        client.create_job(
            bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
        )
        for i in range(3):  # one at a time, each to an idle pool
            tid = f"t{i}"
            client.create_task(
                job_id,
                bm.BatchTaskCreateOptions(
                    id=tid,
                    command_line="/bin/true",
                    affinity_info=bm.BatchAffinityInfo(affinity_id=target.affinity_id),
                ),
            )
            task = wait(
                lambda tid=tid: (
                    (t := client.get_task(job_id, tid)).state == bm.BatchTaskState.COMPLETED and t
                ),
                f"task {tid}",
            )
            assert task.node_info is not None
            assert task.node_info.node_id == target.id
            assert task.affinity_info is not None
            assert task.affinity_info.affinity_id == target.affinity_id
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()
