"""Microsoft's `azure-batch` 15.1.0, unmodified, against a real `tvm up`: output files (Azure's
container destination, uploaded to a loopback server that takes blobs as Azure Storage does),
multi-instance tasks with their subtasks, and required slots, with their fields round-tripping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.exceptions import HttpResponseError

from tests.azure import sdk15
from tests.azure.sdk15 import idle_nodes, ubuntu_pool, uid, wait
from tests.blobserver import BlobStore, blob_server

up = sdk15.up_fixture(3)
client = sdk15.client_fixture()


@pytest.fixture
def store() -> Iterator[BlobStore]:
    with blob_server() as s:
        yield s


def _out(pattern: str, url: str, path: str, cond: bm.OutputFileUploadCondition) -> bm.OutputFile:
    return bm.OutputFile(
        file_pattern=pattern,
        destination=bm.OutputFileDestination(
            container=bm.OutputFileBlobContainerDestination(container_url=url, path=path)
        ),
        upload_options=bm.OutputFileUploadConfiguration(upload_condition=cond),
    )


def _completed(client: BatchClient, job_id: str, task_id: str) -> bm.BatchTask | None:
    t = client.get_task(job_id, task_id)
    return t if t.state == bm.BatchTaskState.COMPLETED else None


def test_output_files_multi_instance_and_slots(client: BatchClient, store: BlobStore) -> None:
    pool_id, job_id = uid("wf-pool"), uid("wf-job")
    client.create_pool(ubuntu_pool(pool_id, 3, enable_inter_node_communication=True))
    idle_nodes(client, pool_id, 3, "three idle nodes")
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )
    url = store.url("results")
    c = bm.OutputFileUploadCondition
    client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="out",
            command_line="/bin/sh -c 'mkdir -p o && echo one > o/1.txt && echo hi'",
            output_files=[
                _out("o/*.txt", url, "ok", c.TASK_SUCCESS),
                _out("o/*.txt", url, "bad", c.TASK_FAILURE),
                _out("../std*.txt", url, "logs", c.TASK_COMPLETION),
            ],
        ),
    )
    t = wait(lambda: _completed(client, job_id, "out"), "out completed")
    assert t.execution_info.result == bm.BatchTaskExecutionResult.SUCCESS
    assert store.blobs["/results/ok/1.txt"] == b"one\n"
    assert store.blobs["/results/logs/stdout.txt"] == b"hi\n"
    assert not [p for p in store.blobs if p.startswith("/results/bad/")]
    files = t.output_files or []
    assert [f.file_pattern for f in files] == ["o/*.txt", "o/*.txt", "../std*.txt"]
    assert files[0].destination.container.container_url == url
    assert files[0].destination.container.path == "ok"
    assert files[1].upload_options.upload_condition == c.TASK_FAILURE

    # A refused upload: the task's failure, its exit code kept.
    client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="denied",
            command_line="/bin/sh -c 'echo x > x.txt'",
            output_files=[_out("x.txt", store.url("denied"), "x.txt", c.TASK_COMPLETION)],
        ),
    )
    t = wait(lambda: _completed(client, job_id, "denied"), "denied completed")
    assert t.execution_info.exit_code == 0
    assert t.execution_info.result == bm.BatchTaskExecutionResult.FAILURE
    assert t.execution_info.failure_info.code == "FileUploadMiscError"

    # Multi-instance: three nodes at once, two subtasks beside the primary.
    client.create_task(
        job_id,
        bm.BatchTaskCreateOptions(
            id="mpi",
            command_line="/bin/sh -c 'echo app $AZ_BATCH_IS_CURRENT_NODE_MASTER $AZ_BATCH_HOST_LIST'",
            multi_instance_settings=bm.MultiInstanceSettings(
                number_of_instances=3,
                coordination_command_line="/bin/sh -c 'echo coord $TVM_INSTANCE_INDEX'",
            ),
        ),
    )
    t = wait(lambda: _completed(client, job_id, "mpi"), "mpi completed")
    assert t.execution_info.exit_code == 0
    assert t.multi_instance_settings.number_of_instances == 3
    assert t.multi_instance_settings.coordination_command_line.endswith("$TVM_INSTANCE_INDEX'")
    out = b"".join(client.download_task_file(job_id, "mpi", "stdout.txt")).decode()
    assert out.startswith("app true ")
    assert len(out.split()[2].split(",")) == 3
    subs = list(client.list_subtasks(job_id, "mpi"))
    assert sorted(s.id for s in subs) == [1, 2]
    assert {s.state for s in subs} == {bm.BatchSubtaskState.COMPLETED}
    nodes = {s.node_info.node_id for s in subs} | {t.node_info.node_id}
    assert len(nodes) == 3
    for n in client.list_nodes(pool_id):
        assert n.running_task_slots_count == 0

    # Required slots: round trip on a 4-slot pool; more than a node has is refused.
    wide_pool, wide_job = uid("wf-wide"), uid("wf-widejob")
    client.create_pool(ubuntu_pool(wide_pool, 0, task_slots_per_node=4))
    client.create_job(
        bm.BatchJobCreateOptions(id=wide_job, pool_info=bm.BatchPoolInfo(pool_id=wide_pool))
    )
    client.create_task(
        wide_job, bm.BatchTaskCreateOptions(id="two", command_line="true", required_slots=2)
    )
    assert client.get_task(wide_job, "two").required_slots == 2
    with pytest.raises(HttpResponseError) as ei:
        client.create_task(
            wide_job, bm.BatchTaskCreateOptions(id="five", command_line="true", required_slots=5)
        )
    assert ei.value.status_code == 400
    assert "requiredSlots" in str(ei.value)
    # Multi-instance on a pool without inter-node communication: refused.
    with pytest.raises(HttpResponseError) as ei:
        client.create_task(
            wide_job,
            bm.BatchTaskCreateOptions(
                id="mi",
                command_line="true",
                multi_instance_settings=bm.MultiInstanceSettings(
                    number_of_instances=2, coordination_command_line="true"
                ),
            ),
        )
    assert ei.value.status_code == 400
