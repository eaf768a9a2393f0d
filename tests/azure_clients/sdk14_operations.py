"""The rest of the Azure Batch operations with `azure-batch==14.2.0`, unmodified, against the
endpoint in TVM_ENDPOINT / TVM_ACCOUNT / TVM_KEY: what the quickstart does not touch. Runs in its
own virtual environment; prints one JSON report line (see report.py), exits 1 if any step failed.

Refused pool shapes (Windows, cloud service, unknown size) leave nothing behind; a start task and
its node files; node counts; the AZ_BATCH_* environment; a failing task's failureInfo; terminate,
reactivate, update and delete of a running task; subtasks; file properties, ranges and delete; job
patch, update, list $filter, disable/enable, terminate; job preparation and release tasks and their
status; node scheduling, reboot, reimage, remote login settings; resize, stop resize, remove nodes;
404 codes; request ids and a 304.
"""

from __future__ import annotations

import datetime
import os
import sys
import uuid

import azure.batch.models as bm
from azure.batch import BatchServiceClient
from azure.batch.batch_auth import SharedKeyCredentials
from report import Abort, Report, wait_until

POOL = "ops-pool"
JOB = "ops-job"
VM_SIZE = "standard_d2_v2"
SKU = "batch.node.ubuntu 22.04"
UBUNTU = bm.ImageReference(
    publisher="Canonical", offer="0001-com-ubuntu-server-jammy", sku="22_04-lts", version="latest"
)
SH = "/bin/sh -c "


def expect_error(call, status: int, code: str | None) -> bm.BatchErrorException:  # noqa: ANN001
    """`call()` must raise BatchErrorException with this HTTP status (and Azure code if given)."""
    try:
        call()
    except bm.BatchErrorException as exc:
        got_code = exc.error.code if exc.error else None
        if exc.response.status_code != status or (code is not None and got_code != code):
            raise AssertionError(
                f"expected HTTP {status} {code}, got {exc.response.status_code} {got_code}: {exc}"
            ) from exc
        return exc
    raise AssertionError(f"expected HTTP {status} {code}, but the call succeeded")


def main() -> int:
    client = BatchServiceClient(
        SharedKeyCredentials(os.environ["TVM_ACCOUNT"], os.environ["TVM_KEY"]),
        batch_url=os.environ["TVM_ENDPOINT"],
    )
    r = Report()
    try:
        refused_pools(client, r)
        pool_and_nodes(client, r)
        tasks(client, r)
        jobs(client, r)
        prep_release(client, r)
        node_operations(client, r)
        resizing(client, r)
    except Abort:
        pass
    finally:
        cleanup(client, r)
    return r.dump()


def refused_pools(client: BatchServiceClient, r: Report) -> None:
    def pool(pid: str, **kw: object) -> bm.PoolAddParameter:
        return bm.PoolAddParameter(id=pid, target_dedicated_nodes=1, **kw)

    windows = pool(
        "win-pool",
        vm_size=VM_SIZE,
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=bm.ImageReference(
                publisher="MicrosoftWindowsServer", offer="WindowsServer", sku="2019-Datacenter"
            ),
            node_agent_sku_id="batch.node.windows amd64",
        ),
    )
    cloud = pool(
        "cloud-pool",
        vm_size=VM_SIZE,
        cloud_service_configuration=bm.CloudServiceConfiguration(os_family="6"),
    )
    unknown = pool(
        "size-pool",
        vm_size="Standard_Z99_v9",
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=UBUNTU, node_agent_sku_id=SKU
        ),
    )
    for name, p in (
        ("Windows image", windows),
        ("cloud service", cloud),
        ("unknown vmSize", unknown),
    ):
        with r.step(f"pool with {name} is 400 InvalidPropertyValue and not created"):
            exc = expect_error(lambda p=p: client.pool.add(p), 400, "InvalidPropertyValue")
            keys = {d.key for d in (exc.error.values or [])}
            assert "PropertyName" in keys, f"error values {keys} do not name the property"
            assert client.pool.exists(p.id) is False


def pool_and_nodes(client: BatchServiceClient, r: Report) -> None:
    pool = bm.PoolAddParameter(
        id=POOL,
        vm_size=VM_SIZE,
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=UBUNTU, node_agent_sku_id=SKU
        ),
        target_dedicated_nodes=2,
        start_task=bm.StartTask(
            command_line=SH + "'echo started $AZ_BATCH_NODE_ID'", wait_for_success=True
        ),
        metadata=[bm.MetadataItem(name="owner", value="ops")],
    )
    with r.step("create pool with a start task", fatal=True):
        client.pool.add(pool)

    def idle(n: int) -> list[bm.ComputeNode] | None:
        nodes = list(client.compute_node.list(POOL))
        ok = len(nodes) == n and all(x.state == bm.ComputeNodeState.idle for x in nodes)
        return nodes if ok else None

    with r.step("nodes idle after the start task", fatal=True):
        nodes = wait_until(lambda: idle(2), 120, "2 idle nodes")
        r.facts["nodes"] = sorted(n.id for n in nodes)
    with r.step("start task info on the node"):
        node = client.compute_node.get(POOL, r.facts["nodes"][0])
        info = node.start_task_info
        assert info is not None, "no startTaskInfo"
        assert info.state == bm.StartTaskState.completed, info.state
        assert info.exit_code == 0, info.exit_code
        assert node.start_task is not None
        assert node.start_task.command_line == pool.start_task.command_line
    with r.step("node files: list, get startup/stdout.txt, properties"):
        nid = r.facts["nodes"][0]
        names = {f.name for f in client.file.list_from_compute_node(POOL, nid, recursive=True)}
        assert "startup/stdout.txt" in names, sorted(names)[:40]
        data = b"".join(client.file.get_from_compute_node(POOL, nid, "startup/stdout.txt"))
        assert data.decode().strip() == f"started {nid}", data
        raw = client.file.get_properties_from_compute_node(
            POOL, nid, "startup/stdout.txt", raw=True
        )
        assert int(raw.headers["Content-Length"]) == len(data), raw.headers
    with r.step("pool node counts"):
        counts = {c.pool_id: c for c in client.account.list_pool_node_counts()}
        mine = counts[POOL]
        assert (mine.dedicated.idle, mine.dedicated.total) == (2, 2), mine.dedicated
        assert mine.low_priority.total == 0, mine.low_priority
    with r.step("pool metadata round-trips"):
        meta = client.pool.get(POOL).metadata or []
        assert [(m.name, m.value) for m in meta] == [("owner", "ops")], meta
    with r.step("request id, client request id echo, ETag and Last-Modified headers"):
        cid = str(uuid.uuid4())
        raw = client.pool.get(
            POOL,
            bm.PoolGetOptions(client_request_id=cid, return_client_request_id=True),
            raw=True,
        )
        h = raw.response.headers
        assert h.get("client-request-id") == cid, dict(h)
        assert h.get("request-id"), dict(h)
        assert h.get("ETag"), dict(h)
        assert h.get("Last-Modified"), dict(h)
        r.facts["etag"] = h["ETag"]
    with r.step("If-None-Match with the current ETag is 304"):
        expect_error(
            lambda: client.pool.get(POOL, bm.PoolGetOptions(if_none_match=r.facts["etag"])),
            304,
            None,
        )
    with r.step("404 codes: pool, node, job, task"):
        expect_error(lambda: client.pool.get("no-pool"), 404, "PoolNotFound")
        expect_error(lambda: client.compute_node.get(POOL, "no-node"), 404, "NodeNotFound")
        expect_error(lambda: client.job.get("no-job"), 404, "JobNotFound")


def wait_task(client: BatchServiceClient, tid: str, state: bm.TaskState, timeout: float = 60):  # noqa: ANN201
    return wait_until(
        lambda: (t := client.task.get(JOB, tid)).state == state and t,
        timeout,
        f"task {tid} {state}",
    )


def tasks(client: BatchServiceClient, r: Report) -> None:
    with r.step("create job", fatal=True):
        client.job.add(bm.JobAddParameter(id=JOB, pool_info=bm.PoolInformation(pool_id=POOL)))
    with r.step("task not found is 404 TaskNotFound"):
        expect_error(lambda: client.task.get(JOB, "no-task"), 404, "TaskNotFound")
    env_cmd = (
        SH + "'echo $AZ_BATCH_JOB_ID $AZ_BATCH_TASK_ID $AZ_BATCH_POOL_ID $AZ_BATCH_NODE_ID; "
        'test -d "$AZ_BATCH_TASK_SHARED_DIR" && test "$(pwd)" = "$AZ_BATCH_TASK_WORKING_DIR" '
        "&& echo dirs-ok'"
    )
    with r.step("AZ_BATCH_* environment of a task"):
        client.task.add(JOB, bm.TaskAddParameter(id="t-env", command_line=env_cmd))
        t = wait_task(client, "t-env", bm.TaskState.completed)
        out = b"".join(client.file.get_from_task(JOB, "t-env", "stdout.txt")).decode().split("\n")
        assert out[0] == f"{JOB} t-env {POOL} {t.node_info.node_id}", out
        assert out[1] == "dirs-ok", out
    with r.step("file properties (HEAD) give the file's size"):
        whole = b"".join(client.file.get_from_task(JOB, "t-env", "stdout.txt"))
        raw = client.file.get_properties_from_task(JOB, "t-env", "stdout.txt", raw=True)
        size = int(raw.headers["Content-Length"])
        assert size == len(whole), (size, len(whole), dict(raw.headers))
    with r.step("a byte range of a task file (ocp-range)"):
        part = b"".join(
            client.file.get_from_task(
                JOB, "t-env", "stdout.txt", bm.FileGetFromTaskOptions(ocp_range="bytes=0-5")
            )
        )
        assert part == whole[:6], (part, whole)
    with r.step("a failing task: exit code, result failure, usererror"):
        client.task.add(JOB, bm.TaskAddParameter(id="t-fail", command_line=SH + "'exit 3'"))
        t = wait_task(client, "t-fail", bm.TaskState.completed)
        info = t.execution_info
        assert info.exit_code == 3, info.exit_code
        assert info.result == bm.TaskExecutionResult.failure, info.result
        assert info.failure_info is not None, "no failureInfo"
        assert info.failure_info.category == bm.ErrorCategory.user_error, info.failure_info
    with r.step("delete a task file, then it is 404"):
        client.file.delete_from_task(JOB, "t-fail", "stdout.txt")
        expect_error(
            lambda: b"".join(client.file.get_from_task(JOB, "t-fail", "stdout.txt")), 404, None
        )
    with r.step("running task: update constraints, terminate, reactivate, delete"):
        client.task.add(JOB, bm.TaskAddParameter(id="t-long", command_line=SH + "'sleep 300'"))
        wait_task(client, "t-long", bm.TaskState.running)
        client.task.update(
            JOB,
            "t-long",
            constraints=bm.TaskConstraints(
                max_wall_clock_time=datetime.timedelta(hours=1), max_task_retry_count=1
            ),
        )
        got = client.task.get(JOB, "t-long")
        assert got.constraints.max_task_retry_count == 1, got.constraints
        assert got.constraints.max_wall_clock_time == datetime.timedelta(hours=1), got.constraints
        client.task.terminate(JOB, "t-long")
        done = wait_task(client, "t-long", bm.TaskState.completed)
        assert done.execution_info.result == bm.TaskExecutionResult.failure, done.execution_info
        client.task.reactivate(JOB, "t-long")
        again = client.task.get(JOB, "t-long")
        assert again.state in (bm.TaskState.active, bm.TaskState.running), again.state
        client.task.delete(JOB, "t-long")
        expect_error(lambda: client.task.get(JOB, "t-long"), 404, "TaskNotFound")
    with r.step("subtasks of a normal task: empty"):
        subs = client.task.list_subtasks(JOB, "t-env")
        assert list(subs.value or []) == [], subs.value


def jobs(client: BatchServiceClient, r: Report) -> None:
    with r.step("job patch priority, PUT resets it"):
        client.job.patch(JOB, bm.JobPatchParameter(priority=100))
        assert client.job.get(JOB).priority == 100
        client.job.update(JOB, bm.JobUpdateParameter(pool_info=bm.PoolInformation(pool_id=POOL)))
        assert client.job.get(JOB).priority == 0
    with r.step("job list with $filter"):
        found = [j.id for j in client.job.list(bm.JobListOptions(filter=f"id eq '{JOB}'"))]
        assert found == [JOB], found
        assert [
            j.id for j in client.job.list(bm.JobListOptions(filter="state eq 'completed'"))
        ] == []
    with r.step("job disable and enable"):
        client.job.disable(JOB, bm.DisableJobOption.requeue)
        wait_until(
            lambda: client.job.get(JOB).state == bm.JobState.disabled, 30, "the job disabled"
        )
        client.job.enable(JOB)
        wait_until(lambda: client.job.get(JOB).state == bm.JobState.active, 30, "the job active")
    with r.step("task counts with slot counts agree with the task list"):
        listed = list(client.task.list(JOB))
        done = [t for t in listed if t.state == bm.TaskState.completed]
        ok = [t for t in done if t.execution_info.result == bm.TaskExecutionResult.success]
        counts = client.job.get_task_counts(JOB)
        c = counts.task_counts
        assert (c.completed, c.succeeded, c.failed) == (
            len(done),
            len(ok),
            len(done) - len(ok),
        ), (c, [(t.id, t.state) for t in listed])
        assert counts.task_slot_counts is not None, "no taskSlotCounts"
        assert counts.task_slot_counts.completed == len(done), counts.task_slot_counts


def prep_release(client: BatchServiceClient, r: Report) -> None:
    jid = f"prep-{uuid.uuid4().hex[:8]}"
    with r.step("job with preparation and release tasks: tasks read what it left"):
        client.job.add(
            bm.JobAddParameter(
                id=jid,
                pool_info=bm.PoolInformation(pool_id=POOL),
                job_preparation_task=bm.JobPreparationTask(
                    command_line=SH + "'echo prepared > marker.txt'"
                ),
                job_release_task=bm.JobReleaseTask(command_line=SH + "'echo released'"),
            )
        )
        cmd = SH + "'cat $AZ_BATCH_JOB_PREP_WORKING_DIR/marker.txt'"
        client.task.add(jid, bm.TaskAddParameter(id="t", command_line=cmd))
        wait_until(
            lambda: client.task.get(jid, "t").state == bm.TaskState.completed, 60, "task done"
        )
        out = b"".join(client.file.get_from_task(jid, "t", "stdout.txt")).decode()
        assert out.strip() == "prepared", out
    with r.step("job.list_preparation_and_release_task_status after terminate"):
        client.job.terminate(jid)
        wait_until(lambda: client.job.get(jid).state == bm.JobState.completed, 60, "job completed")
        status = list(client.job.list_preparation_and_release_task_status(jid))
        assert status, "no status"
        for s in status:
            prep = s.job_preparation_task_execution_info
            rel = s.job_release_task_execution_info
            assert s.pool_id == POOL, s.pool_id
            assert prep.state == bm.JobPreparationTaskState.completed, prep.state
            assert (prep.exit_code, prep.retry_count) == (0, 0), prep
            assert rel.state == bm.JobReleaseTaskState.completed, rel.state
            assert rel.result == bm.TaskExecutionResult.success, rel
        client.job.delete(jid)


def node_operations(client: BatchServiceClient, r: Report) -> None:
    nid = r.facts["nodes"][0]

    def node_state(state: bm.ComputeNodeState) -> bool:
        return client.compute_node.get(POOL, nid).state == state

    with r.step("node disable and enable scheduling"):
        client.compute_node.disable_scheduling(POOL, nid)
        assert client.compute_node.get(POOL, nid).scheduling_state == bm.SchedulingState.disabled
        client.compute_node.enable_scheduling(POOL, nid)
        assert client.compute_node.get(POOL, nid).scheduling_state == bm.SchedulingState.enabled
    with r.step("node remote login settings"):
        settings = client.compute_node.get_remote_login_settings(POOL, nid)
        assert settings.remote_login_ip_address, settings
        assert settings.remote_login_port, settings
    for op in ("reboot", "reimage"):
        with r.step(f"node {op}: the start task runs again, back to idle"):
            before = client.compute_node.get(POOL, nid)
            getattr(client.compute_node, op)(POOL, nid)

            def restarted(before: bm.ComputeNode = before) -> bool:
                now = client.compute_node.get(POOL, nid)
                info = now.start_task_info
                return (
                    now.state == bm.ComputeNodeState.idle
                    and info is not None
                    and info.start_time != before.start_task_info.start_time
                )

            wait_until(restarted, 120, f"the node idle after {op}, its start task run again")
        with r.step(f"node {op}: lastBootTime moves"):
            after = client.compute_node.get(POOL, nid).last_boot_time
            assert after > before.last_boot_time, (before.last_boot_time, after)


def resizing(client: BatchServiceClient, r: Report) -> None:
    def nodes() -> list[bm.ComputeNode]:
        return list(client.compute_node.list(POOL))

    def steady_with(n: int) -> bool:
        pool = client.pool.get(POOL)
        return pool.allocation_state == bm.AllocationState.steady and (
            pool.current_dedicated_nodes == n and len(nodes()) == n
        )

    with r.step("remove one node"):
        client.pool.remove_nodes(POOL, bm.NodeRemoveParameter(node_list=[r.facts["nodes"][1]]))
        wait_until(lambda: steady_with(1), 120, "the pool steady with 1 node")
        assert client.pool.get(POOL).target_dedicated_nodes == 1
    with r.step("resize to 2 and stop resize"):
        client.pool.resize(POOL, bm.PoolResizeParameter(target_dedicated_nodes=2))
        try:
            client.pool.stop_resize(POOL)
        except bm.BatchErrorException as exc:
            # A free agent may have joined already: the pool is steady, nothing to stop.
            if exc.response.status_code != 409:
                raise
            r.facts["stop_resize_on_steady"] = exc.error.code if exc.error else None
        wait_until(
            lambda: client.pool.get(POOL).allocation_state == bm.AllocationState.steady,
            60,
            "the pool steady after stop resize",
        )
    with r.step("resize to 2 reaches 2 idle nodes"):
        client.pool.resize(POOL, bm.PoolResizeParameter(target_dedicated_nodes=2))
        wait_until(lambda: steady_with(2), 120, "the pool steady with 2 nodes")


def cleanup(client: BatchServiceClient, r: Report) -> None:
    r.aborted = False
    try:
        if "create job" not in r.passed:
            raise Abort("no job")
        with r.step("job terminate with a reason"):
            client.job.terminate(JOB, terminate_reason="ops done")
            job = wait_until(
                lambda: (j := client.job.get(JOB)).state == bm.JobState.completed and j,
                60,
                "the job completed",
            )
            assert job.execution_info.terminate_reason == "ops done", job.execution_info
        with r.step("delete job and wait until it is gone"):
            client.job.delete(JOB)
            wait_until(lambda: _gone(lambda: client.job.get(JOB)), 60, "the job to be deleted")
    except Abort:
        pass
    pool_cleanup(client, r)


def pool_cleanup(client: BatchServiceClient, r: Report) -> None:
    try:
        with r.step("delete pool and wait until it is gone"):
            try:
                client.pool.delete(POOL)
            except bm.BatchErrorException as exc:
                if exc.response.status_code != 404:
                    raise
            wait_until(lambda: not client.pool.exists(POOL), 60, "the pool to be deleted")
    except Abort:
        pass


def _gone(get) -> bool:  # noqa: ANN001
    try:
        get()
    except bm.BatchErrorException as exc:
        if exc.response.status_code == 404:
            return True
        raise
    return False


if __name__ == "__main__":
    sys.exit(main())
