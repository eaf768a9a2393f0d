"""Job preparation and release tasks through Microsoft's `azure-batch` 15.1.0, unmodified, against a
real `tvm up`: the job carries both tasks, the preparation runs on each node before the job's
tasks, `list_job_preparation_and_release_task_status` reports both per node in Azure's shape, the
release runs when the job is terminated, and bad requests are refused with Azure's codes."""

from __future__ import annotations

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from tests.azure import sdk15
from tests.azure.sdk15 import idle_nodes, ubuntu_pool, uid, wait

PREP = "/bin/sh -c 'echo prepared > marker.txt'"
TASK = "/bin/sh -c 'cat $AZ_BATCH_JOB_PREP_WORKING_DIR/marker.txt'"
RELEASE = "/bin/sh -c 'echo released'"


up = sdk15.up_fixture(2)
client = sdk15.client_fixture()


def test_prep_and_release_status(client: BatchClient) -> None:
    pool_id, job_id = uid("prep-pool"), uid("prep-job")
    client.create_pool(ubuntu_pool(pool_id, 2))
    try:
        idle_nodes(client, pool_id, 2, "two idle nodes")
        client.create_job(
            bm.BatchJobCreateOptions(
                id=job_id,
                pool_info=bm.BatchPoolInfo(pool_id=pool_id),
                job_preparation_task=bm.BatchJobPreparationTask(
                    command_line=PREP,
                    constraints=bm.BatchTaskConstraints(max_task_retry_count=1),
                ),
                job_release_task=bm.BatchJobReleaseTask(command_line=RELEASE),
            )
        )
        job = client.get_job(job_id)
        assert job.job_preparation_task is not None
        assert job.job_preparation_task.id == "jobpreparation"
        assert job.job_preparation_task.wait_for_success is True
        assert job.job_release_task is not None
        assert job.job_release_task.id == "jobrelease"
        client.create_tasks(
            job_id, [bm.BatchTaskCreateOptions(id=f"t{i}", command_line=TASK) for i in range(4)]
        )

        def done() -> list[bm.BatchTask] | None:
            ts = list(client.list_tasks(job_id))
            return ts if all(t.state == bm.BatchTaskState.COMPLETED for t in ts) else None

        for t in wait(done, "four completed tasks"):
            out = b"".join(client.download_task_file(job_id, t.id, "stdout.txt"))
            assert out.decode().strip() == "prepared"
        status = list(client.list_job_preparation_and_release_task_status(job_id))
        assert status
        nodes = {n.id for n in client.list_nodes(pool_id)}
        for s in status:
            assert s.pool_id == pool_id
            assert s.node_id in nodes
            assert s.node_url is not None
            assert s.node_url.endswith(f"/pools/{pool_id}/nodes/{s.node_id}")
            info = s.job_preparation_task_execution_info
            assert info is not None
            assert info.state == bm.BatchJobPreparationTaskState.COMPLETED
            assert (info.exit_code, info.retry_count) == (0, 0)
            assert info.result == bm.BatchTaskExecutionResult.SUCCESS
            assert info.start_time is not None
            assert info.end_time is not None
            assert info.task_root_directory == f"workitems/{job_id}/job-1/jobpreparation"
            assert s.job_release_task_execution_info is None
        # $filter on the status list is the service's.
        one = status[0].node_id
        assert [
            s.node_id
            for s in client.list_job_preparation_and_release_task_status(
                job_id, filter=f"nodeId eq '{one}'"
            )
        ] == [one]

        # Without options the SDK fails before sending (no content type for an empty body); its
        # options class is not exported from azure.batch.models.
        client.begin_terminate_job(
            job_id, BatchJobTerminateOptions(termination_reason="done"), polling_interval=1
        ).result()

        def released() -> list[bm.BatchJobPreparationAndReleaseTaskStatus] | None:
            st = list(client.list_job_preparation_and_release_task_status(job_id))
            infos = [s.job_release_task_execution_info for s in st]
            ok = all(
                i is not None and i.state == bm.BatchJobReleaseTaskState.COMPLETED for i in infos
            )
            return st if ok else None

        for s in wait(released, "release tasks completed"):
            rel = s.job_release_task_execution_info
            assert rel is not None
            assert rel.exit_code == 0
            assert rel.result == bm.BatchTaskExecutionResult.SUCCESS
            out = b"".join(
                client.download_node_file(
                    pool_id, s.node_id, f"{rel.task_root_directory}/stdout.txt"
                )
            )
            assert out.decode().strip() == "released"
        wait(lambda: client.get_job(job_id).state == bm.BatchJobState.COMPLETED, "job completed")
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_bad_prep_requests_are_refused(client: BatchClient) -> None:
    pool_id, job_id = uid("bad-pool"), uid("bad-job")
    client.create_pool(ubuntu_pool(pool_id, 0))
    try:
        with pytest.raises(HttpResponseError) as exc:
            client.create_job(
                bm.BatchJobCreateOptions(
                    id=job_id,
                    pool_info=bm.BatchPoolInfo(pool_id=pool_id),
                    job_release_task=bm.BatchJobReleaseTask(command_line=RELEASE),
                )
            )
        assert exc.value.status_code == 400
        with pytest.raises(ResourceNotFoundError):
            client.get_job(job_id)  # nothing was created
        client.create_job(
            bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
        )
        with pytest.raises(HttpResponseError) as exc:
            list(client.list_job_preparation_and_release_task_status(job_id))
        assert exc.value.status_code == 409
        assert exc.value.error is not None
        assert exc.value.error.code == "JobPreparationTaskNotSpecified"
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.create_job(
            bm.BatchJobCreateOptions(
                id=job_id,
                pool_info=bm.BatchPoolInfo(pool_id=pool_id),
                job_preparation_task=bm.BatchJobPreparationTask(id="prep", command_line=PREP),
            )
        )
        with pytest.raises(HttpResponseError) as exc:
            client.create_task(job_id, bm.BatchTaskCreateOptions(id="prep", command_line="true"))
        assert exc.value.status_code == 409
        assert exc.value.error is not None
        assert exc.value.error.code == "TaskIdSameAsJobPreparationTask"
        assert list(client.list_tasks(job_id)) == []
    finally:
        try:
            client.begin_delete_job(job_id, polling_interval=1).result()
        except ResourceNotFoundError:
            pass
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_a_job_schedules_jobs_get_its_prep_and_release(client: BatchClient) -> None:
    pool_id, sid = uid("sched-pool"), uid("sched")
    client.create_pool(ubuntu_pool(pool_id, 1))
    try:
        spec = bm.BatchJobSpecification(
            pool_info=bm.BatchPoolInfo(pool_id=pool_id),
            job_preparation_task=bm.BatchJobPreparationTask(id="setup", command_line=PREP),
            job_release_task=bm.BatchJobReleaseTask(id="teardown", command_line=RELEASE),
        )
        client.create_job_schedule(
            bm.BatchJobScheduleCreateOptions(
                id=sid, schedule=bm.BatchJobScheduleConfiguration(), job_specification=spec
            )
        )
        shown = client.get_job_schedule(sid).job_specification
        assert shown is not None
        assert shown.job_preparation_task is not None
        assert shown.job_preparation_task.id == "setup"
        assert shown.job_release_task is not None
        assert shown.job_release_task.id == "teardown"
        job = client.get_job(f"{sid}:job-1")
        assert job.job_preparation_task is not None
        assert job.job_preparation_task.id == "setup"
        client.create_task(f"{sid}:job-1", bm.BatchTaskCreateOptions(id="t", command_line=TASK))
        wait(
            lambda: client.get_task(f"{sid}:job-1", "t").state == bm.BatchTaskState.COMPLETED,
            "the schedule's task completed",
        )
        out = b"".join(client.download_task_file(f"{sid}:job-1", "t", "stdout.txt"))
        assert out.decode().strip() == "prepared"
        [status] = client.list_job_preparation_and_release_task_status(f"{sid}:job-1")
        info = status.job_preparation_task_execution_info
        assert info is not None
        assert info.task_root_directory == f"workitems/{sid}/job-1/setup"
    finally:
        client.begin_delete_job_schedule(sid, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()
