"""The Azure Batch quickstart with `azure-batch==14.2.0` (`BatchServiceClient`, msrest), unmodified,
against the endpoint in TVM_ENDPOINT / TVM_ACCOUNT / TVM_KEY. Runs in its own virtual environment;
prints one JSON report line (see report.py) and exits 1 if any step failed.

Flow: a Linux pool of 2 nodes with an Azure VM size name and an Ubuntu image reference, nodes idle,
a job, a collection of 10 tasks `/bin/sh -c 'echo hello $AZ_BATCH_TASK_ID'`, wait by listing, each
task's node_info and stdout.txt, then delete the job and the pool and wait for both to be gone.
Around it: paging with max_results=1, $filter, $select, a server timeout, pool exists, duplicate
creates, a conditional update refused with 412, supported images.
"""

from __future__ import annotations

import os
import sys

import azure.batch.models as bm
from azure.batch import BatchServiceClient
from azure.batch.batch_auth import SharedKeyCredentials
from report import Abort, Report, wait_until

POOL = "sdk14-pool"
JOB = "sdk14-job"
VM_SIZE = "STANDARD_D2S_V3"
N_TASKS = 10
UBUNTU = bm.ImageReference(
    publisher="Canonical",
    offer="0001-com-ubuntu-server-focal",
    sku="20_04-lts",
    version="latest",
)


def expect_error(call, status: int, code: str) -> None:  # noqa: ANN001
    """`call()` must raise BatchErrorException with this HTTP status and Azure error code."""
    try:
        call()
    except bm.BatchErrorException as exc:
        got = (exc.response.status_code, exc.error.code if exc.error else None)
        if got != (status, code):
            raise AssertionError(f"expected HTTP {status} {code}, got {got}: {exc}") from exc
        return
    raise AssertionError(f"expected HTTP {status} {code}, but the call succeeded")


def main() -> int:
    client = BatchServiceClient(
        SharedKeyCredentials(os.environ["TVM_ACCOUNT"], os.environ["TVM_KEY"]),
        batch_url=os.environ["TVM_ENDPOINT"],
    )
    r = Report()
    try:
        flow(client, r)
    except Abort:
        pass
    finally:
        cleanup(client, r)
    return r.dump()


def flow(client: BatchServiceClient, r: Report) -> None:
    with r.step("supported images list Ubuntu 20.04"):
        images = list(client.account.list_supported_images())
        skus = {i.node_agent_sku_id for i in images}
        assert "batch.node.ubuntu 20.04" in skus, skus
        linux = list(
            client.account.list_supported_images(
                bm.AccountListSupportedImagesOptions(filter="osType eq 'linux'")
            )
        )
        assert linux, "no linux image with $filter=osType eq 'linux'"

    pool = bm.PoolAddParameter(
        id=POOL,
        vm_size=VM_SIZE,
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=UBUNTU, node_agent_sku_id="batch.node.ubuntu 20.04"
        ),
        target_dedicated_nodes=2,
        task_slots_per_node=2,
    )
    with r.step("create pool", fatal=True):
        client.pool.add(pool)
    with r.step("pool exists (true and false)"):
        assert client.pool.exists(POOL) is True
        assert client.pool.exists("no-such-pool") is False
    with r.step("duplicate pool create is 409 PoolExists"):
        expect_error(lambda: client.pool.add(pool), 409, "PoolExists")
    with r.step("get pool echoes vmSize and image"):
        got = client.pool.get(POOL, bm.PoolGetOptions(timeout=10))  # a server timeout
        assert got.vm_size.lower() == VM_SIZE.lower(), got.vm_size
        vmc = got.virtual_machine_configuration
        assert vmc is not None, "no virtualMachineConfiguration"
        assert vmc.node_agent_sku_id == "batch.node.ubuntu 20.04", vmc.node_agent_sku_id
        assert vmc.image_reference.offer == UBUNTU.offer, vmc.image_reference
        assert got.target_dedicated_nodes == 2
        assert got.task_slots_per_node == 2
        r.facts["pool_etag"] = got.e_tag
    with r.step("conditional update with a stale ETag is 412 ConditionNotMet"):
        stale = bm.PoolPatchOptions(if_match='"0x8D4125FD1A825A4"')
        patch = bm.PoolPatchParameter(metadata=[bm.MetadataItem(name="k", value="v")])
        expect_error(lambda: client.pool.patch(POOL, patch, stale), 412, "ConditionNotMet")
    with r.step("conditional update with the current ETag succeeds"):
        etag = client.pool.get(POOL).e_tag
        client.pool.patch(POOL, patch, bm.PoolPatchOptions(if_match=etag))
        meta = client.pool.get(POOL).metadata or []
        assert [(m.name, m.value) for m in meta] == [("k", "v")], meta

    def idle_nodes() -> list[bm.ComputeNode] | None:
        nodes = list(client.compute_node.list(POOL))
        ok = len(nodes) == 2 and all(n.state == bm.ComputeNodeState.idle for n in nodes)
        return nodes if ok else None

    with r.step("two nodes idle", fatal=True):
        nodes = wait_until(idle_nodes, 120, "2 idle nodes")
        node_ids = {n.id for n in nodes}
        r.facts["nodes"] = sorted(node_ids)
    with r.step("node get"):
        node = client.compute_node.get(POOL, sorted(node_ids)[0])
        assert node.id in node_ids
        assert node.state == bm.ComputeNodeState.idle
        assert node.vm_size.lower() == VM_SIZE.lower(), node.vm_size
        assert node.is_dedicated is True
    with r.step("pool list with $filter and $select"):
        found = list(
            client.pool.list(bm.PoolListOptions(filter=f"id eq '{POOL}'", select="id,state"))
        )
        assert [(p.id, p.state) for p in found] == [(POOL, bm.PoolState.active)], found
        assert found[0].vm_size is None, "$select=id,state returned vmSize too"

    job = bm.JobAddParameter(id=JOB, pool_info=bm.PoolInformation(pool_id=POOL))
    with r.step("create job", fatal=True):
        client.job.add(job)
    with r.step("duplicate job create is 409 JobExists"):
        expect_error(lambda: client.job.add(job), 409, "JobExists")

    tasks = [
        bm.TaskAddParameter(id=f"task{i}", command_line="/bin/sh -c 'echo hello $AZ_BATCH_TASK_ID'")
        for i in range(N_TASKS)
    ]
    with r.step("add collection of 10 tasks", fatal=True):
        result = client.task.add_collection(JOB, tasks)
        statuses = {v.task_id: v.status for v in result.value}
        assert statuses == {t.id: bm.TaskAddStatus.success for t in tasks}, statuses
    with r.step("duplicate task create is 409 TaskExists"):
        expect_error(lambda: client.task.add(JOB, tasks[0]), 409, "TaskExists")

    def all_completed() -> list[bm.CloudTask] | None:
        listed = list(client.task.list(JOB))
        done = len(listed) == N_TASKS and all(t.state == bm.TaskState.completed for t in listed)
        return listed if done else None

    with r.step("tasks complete (waiting by listing)", fatal=True):
        done = wait_until(all_completed, 120, "10 completed tasks")
    with r.step("each task succeeded on a pool node"):
        for t in done:
            info = t.execution_info
            assert info.exit_code == 0, (t.id, info.exit_code, info.failure_info)
            assert info.result == bm.TaskExecutionResult.success, (t.id, info.result)
            assert t.node_info is not None, f"{t.id} has no nodeInfo"
            assert t.node_info.pool_id == POOL, (t.id, t.node_info.pool_id)
            assert t.node_info.node_id in node_ids, (t.id, t.node_info.node_id)
    with r.step("each stdout.txt says hello taskN"):
        for t in done:
            data = b"".join(client.file.get_from_task(JOB, t.id, "stdout.txt"))
            assert data.decode().strip() == f"hello {t.id}", (t.id, data)
    with r.step("task list pages with max_results=1 follow next links"):
        paged = client.task.list(JOB, bm.TaskListOptions(max_results=1))
        pages: list[list[str]] = []
        try:
            while True:
                pages.append([t.id for t in paged.advance_page()])
        except StopIteration:
            pass
        assert all(len(p) == 1 for p in pages), pages
        assert sorted(i for p in pages for i in p) == sorted(t.id for t in tasks), pages
    with r.step("task list pages keep $filter and $select across next links"):
        opts = bm.TaskListOptions(
            max_results=3, filter="executionInfo/result eq 'success'", select="id,state"
        )
        paged = client.task.list(JOB, opts)
        pages = []
        try:
            while True:
                pages.append(list(paged.advance_page()))
        except StopIteration:
            pass
        assert [len(p) for p in pages] == [3, 3, 3, 1], [len(p) for p in pages]
        every = [t for p in pages for t in p]
        assert sorted(t.id for t in every) == sorted(t.id for t in tasks)
        assert all(t.command_line is None and t.state for t in every), "$select lost on a page"
    with r.step("task list with $filter"):
        one = list(client.task.list(JOB, bm.TaskListOptions(filter="startswith(id,'task1')")))
        assert [t.id for t in one] == ["task1"], [t.id for t in one]
        ok = list(
            client.task.list(
                JOB,
                bm.TaskListOptions(filter="state eq 'completed' and executionInfo/exitCode eq 0"),
            )
        )
        assert len(ok) == N_TASKS, len(ok)
    with r.step("an unsupported $filter is a 400"):
        expect_error(
            lambda: list(client.task.list(JOB, bm.TaskListOptions(filter="endswith(id,'1')"))),
            400,
            "InvalidQueryParameterValue",
        )
    with r.step("task files list has stdout.txt"):
        names = {f.name for f in client.file.list_from_task(JOB, "task0", recursive=True)}
        assert "stdout.txt" in names, names
    with r.step("job task counts"):
        counts = client.job.get_task_counts(JOB)
        assert counts.task_counts.completed == N_TASKS, counts.task_counts
        assert counts.task_counts.succeeded == N_TASKS, counts.task_counts


def cleanup(client: BatchServiceClient, r: Report) -> None:
    r.aborted = False  # cleanup runs whatever failed before

    def job_gone() -> bool:
        try:
            client.job.get(JOB)
        except bm.BatchErrorException as exc:
            if exc.response.status_code == 404:
                return True
            raise
        return False

    try:
        with r.step("delete job and wait until it is gone"):
            try:
                client.job.delete(JOB)
            except bm.BatchErrorException as exc:
                if exc.response.status_code != 404:
                    raise
            wait_until(job_gone, 60, "the job to be deleted")
        with r.step("delete pool and wait until it is gone"):
            try:
                client.pool.delete(POOL)
            except bm.BatchErrorException as exc:
                if exc.response.status_code != 404:
                    raise
            wait_until(lambda: not client.pool.exists(POOL), 60, "the pool to be deleted")
    except Abort:
        pass


if __name__ == "__main__":
    sys.exit(main())
