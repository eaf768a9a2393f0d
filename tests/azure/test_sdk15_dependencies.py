"""Microsoft's `azure-batch` 15.1.0, unmodified, against a real `tvm up`: a job with
`uses_task_dependencies`, tasks with `depends_on` (ids and ranges) and `exit_conditions`, the order
they ran in, a blocked dependent, and the errors Azure gives for dependencies a job does not allow."""

from __future__ import annotations

import time

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.exceptions import HttpResponseError

from tests.azure import sdk15
from tests.azure.sdk15 import ubuntu_pool, uid

up = sdk15.up_fixture(2)
client = sdk15.client_fixture()


def _task(tid: str, cmd: str, **kw: object) -> bm.BatchTaskCreateOptions:
    return bm.BatchTaskCreateOptions(id=tid, command_line=cmd, **kw)


def test_depends_on_with_the_sdk(client: BatchClient) -> None:
    pool_id, job_id = uid("dep-pool"), uid("dep-job")
    client.create_pool(ubuntu_pool(pool_id, 2))
    try:
        client.create_job(
            bm.BatchJobCreateOptions(
                id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id), uses_task_dependencies=True
            )
        )
        assert client.get_job(job_id).uses_task_dependencies is True
        satisfy_3 = bm.ExitConditions(
            exit_codes=[
                bm.ExitCodeMapping(
                    code=3,
                    exit_options=bm.ExitOptions(dependency_action=bm.DependencyAction.SATISFY),
                )
            ]
        )
        tasks = [
            _task("1", "/bin/sh -c 'sleep 0.3'"),
            _task("2", "/bin/sh -c 'exit 3'", exit_conditions=satisfy_3),
            _task("3", "/bin/true"),
            _task("bad", "/bin/sh -c 'exit 4'"),
            _task(
                "fan",
                "/bin/true",
                depends_on=bm.BatchTaskDependencies(
                    task_id_ranges=[bm.BatchTaskIdRange(start=1, end=3)]
                ),
            ),
            _task("last", "/bin/true", depends_on=bm.BatchTaskDependencies(task_ids=["fan"])),
            _task("stuck", "/bin/true", depends_on=bm.BatchTaskDependencies(task_ids=["bad"])),
        ]
        result = client.create_tasks(job_id, tasks)
        assert {r.status for r in result.result_values or []} == {bm.BatchTaskAddStatus.SUCCESS}

        deadline = time.monotonic() + 60
        while client.get_task(job_id, "last").state != bm.BatchTaskState.COMPLETED:
            assert time.monotonic() < deadline, "the dependents never ran"
            time.sleep(0.2)
        got = {t.id: t for t in client.list_tasks(job_id)}
        fan, last = got["fan"], got["last"]
        assert fan.depends_on is not None
        assert [(r.start, r.end) for r in fan.depends_on.task_id_ranges or []] == [(1, 3)]
        assert got["2"].exit_conditions is not None
        assert fan.execution_info is not None
        assert last.execution_info is not None
        for parent in ("1", "2", "3"):
            info = got[parent].execution_info
            assert info is not None
            assert fan.execution_info.start_time >= info.end_time
        assert last.execution_info.start_time >= fan.execution_info.end_time
        # A failure whose dependencyAction is block (the default) leaves its dependent active.
        assert got["stuck"].state == bm.BatchTaskState.ACTIVE
        assert got["stuck"].execution_info is None or got["stuck"].execution_info.start_time is None

        with pytest.raises(HttpResponseError) as exc:
            client.create_task(
                job_id,
                _task("ghost-dep", "true", depends_on=bm.BatchTaskDependencies(task_ids=["nope"])),
            )
        assert exc.value.status_code == 400
        assert exc.value.error is not None
        assert exc.value.error.code == "TaskDependencyNotFound"
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_depends_on_needs_the_job_flag(client: BatchClient) -> None:
    pool_id, job_id = uid("nodep-pool"), uid("nodep-job")
    client.create_pool(ubuntu_pool(pool_id, 0))
    try:
        client.create_job(
            bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
        )
        client.create_task(job_id, _task("a", "true"))
        with pytest.raises(HttpResponseError) as exc:
            client.create_task(
                job_id, _task("b", "true", depends_on=bm.BatchTaskDependencies(task_ids=["a"]))
            )
        assert exc.value.status_code == 400
        assert exc.value.error is not None
        assert exc.value.error.code == "TaskDependenciesNotSpecifiedOnJob"
        assert [t.id for t in client.list_tasks(job_id)] == ["a"]
    finally:
        client.begin_delete_job(job_id, polling_interval=1).result()
        client.begin_delete_pool(pool_id, polling_interval=1).result()
