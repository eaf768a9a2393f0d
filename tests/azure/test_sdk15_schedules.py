"""Microsoft's `azure-batch` 15.1.0 (`BatchClient`, api-version 2025-06-01), unmodified, against a
real `tvm up`: job schedules (create, get, list, exists, update, replace, disable, enable,
terminate, delete and their jobs), a job manager inside a TVM that adds its job's tasks with the
same SDK and the token the service gives it, and autoscale enable / evaluate / disable with the
modern variable names."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from tests.azure import sdk15
from tests.azure.sdk15 import ubuntu_pool, uid, wait

up = sdk15.up_fixture(2)
client = sdk15.client_fixture()


def _delete_schedule(client: BatchClient, sid: str) -> None:
    if sid in {x.id for x in client.list_job_schedules()}:
        client.begin_delete_job_schedule(sid, polling_interval=1).result()


def test_job_schedule_lifecycle(client: BatchClient) -> None:
    pool_id, sid = uid("js-pool"), uid("js")
    client.create_pool(ubuntu_pool(pool_id))
    try:
        spec = bm.BatchJobSpecification(
            pool_info=bm.BatchPoolInfo(pool_id=pool_id),
            priority=5,
            constraints=bm.BatchJobConstraints(max_task_retry_count=1),
            common_environment_settings=[bm.EnvironmentSetting(name="K", value="v")],
        )
        client.create_job_schedule(
            bm.BatchJobScheduleCreateOptions(
                id=sid,
                display_name="every five minutes",
                schedule=bm.BatchJobScheduleConfiguration(
                    recurrence_interval=dt.timedelta(minutes=5),
                    start_window=dt.timedelta(hours=1, minutes=30),
                ),
                job_specification=spec,
                metadata=[bm.BatchMetadataItem(name="owner", value="me")],
            )
        )
        with pytest.raises(ResourceExistsError) as exc:
            client.create_job_schedule(
                bm.BatchJobScheduleCreateOptions(
                    id=sid,
                    schedule=bm.BatchJobScheduleConfiguration(),
                    job_specification=spec,
                )
            )
        assert exc.value.error is not None
        assert exc.value.error.code == "JobScheduleExists"
        assert client.job_schedule_exists(sid) is True
        # The 15.1 SDK's exception policy raises on any 404, a HEAD's too (as against Azure).
        with pytest.raises(ResourceNotFoundError):
            client.job_schedule_exists(sid + "-none")

        s = client.get_job_schedule(sid)
        assert s.display_name == "every five minutes"
        assert s.state == bm.BatchJobScheduleState.ACTIVE
        assert s.schedule is not None
        assert s.schedule.recurrence_interval == dt.timedelta(minutes=5)
        assert s.schedule.start_window == dt.timedelta(hours=1, minutes=30)
        assert s.job_specification.priority == 5
        assert s.job_specification.pool_info.pool_id == pool_id
        assert [(m.name, m.value) for m in s.metadata or []] == [("owner", "me")]

        def recent() -> str | None:
            info = client.get_job_schedule(sid).execution_info
            return info.recent_job.id if info and info.recent_job else None

        assert wait(recent, "the schedule's first job", timeout=90) == f"{sid}:job-1"
        info = client.get_job_schedule(sid).execution_info
        assert info is not None
        assert info.next_run_time is not None
        jobs = list(client.list_jobs_from_schedule(sid))
        assert [j.id for j in jobs] == [f"{sid}:job-1"]
        assert jobs[0].priority == 5
        assert sid in {x.id for x in client.list_job_schedules()}
        stats = client.get_job_schedule(sid, expand=["stats"]).job_schedule_statistics
        assert stats is not None
        assert stats.succeeded_tasks_count == 0

        client.update_job_schedule(
            sid,
            bm.BatchJobScheduleUpdateOptions(
                schedule=bm.BatchJobScheduleConfiguration(recurrence_interval=dt.timedelta(days=1))
            ),
        )
        s = client.get_job_schedule(sid)
        assert s.schedule is not None
        assert s.schedule.recurrence_interval == dt.timedelta(days=1)
        assert s.job_specification.priority == 5  # not in the update: kept
        client.replace_job_schedule(
            sid,
            bm.BatchJobSchedule(
                schedule=bm.BatchJobScheduleConfiguration(
                    recurrence_interval=dt.timedelta(hours=2)
                ),
                job_specification=bm.BatchJobSpecification(
                    pool_info=bm.BatchPoolInfo(pool_id=pool_id), priority=9
                ),
            ),
        )
        s = client.get_job_schedule(sid)
        assert s.job_specification.priority == 9
        assert s.metadata in (None, [])

        client.disable_job_schedule(sid)
        assert client.get_job_schedule(sid).state == bm.BatchJobScheduleState.DISABLED
        client.enable_job_schedule(sid)
        assert client.get_job_schedule(sid).state == bm.BatchJobScheduleState.ACTIVE
        client.begin_terminate_job_schedule(sid, polling_interval=1).result()
        s = client.get_job_schedule(sid)
        assert s.state == bm.BatchJobScheduleState.COMPLETED
        job = client.get_job(f"{sid}:job-1")
        assert job.state == bm.BatchJobState.COMPLETED
        client.begin_delete_job_schedule(sid, polling_interval=1).result()
        assert sid not in {x.id for x in client.list_job_schedules()}
        with pytest.raises(ResourceNotFoundError):
            client.get_job(f"{sid}:job-1")
    finally:
        _delete_schedule(client, sid)
        client.begin_delete_pool(pool_id, polling_interval=1).result()


# Runs inside the job manager task, in the TVM: the Azure SDK with the token the service gives it
# (AZ_BATCH_AUTHENTICATION_TOKEN) as a token credential, scoped to this job. The endpoint is plain
# http on loopback, so each call says so (`enforce_https=False`); over https it is not needed.
MANAGER = r"""
import os, sys, time
from azure.batch import BatchClient, models as bm
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError

class JobToken:
    def get_token(self, *scopes, **kwargs):
        return AccessToken(os.environ["AZ_BATCH_AUTHENTICATION_TOKEN"], int(time.time()) + 3600)

c = BatchClient(os.environ["AZ_BATCH_ACCOUNT_URL"], JobToken())
job = os.environ["AZ_BATCH_JOB_ID"]
tasks = [
    bm.BatchTaskCreateOptions(id=f"t{i}", command_line="/bin/sh -c 'echo made by the manager'")
    for i in range(4)
]
res = c.create_tasks(job, tasks, enforce_https=False)
print("added", sorted(r.task_id for r in res.result_values if r.status == "success"))
print("job", c.get_job(job, enforce_https=False).id)
try:
    c.list_pools(enforce_https=False).next()
    print("pools allowed")
except HttpResponseError as e:
    print("pools refused", e.status_code)
"""


def _task_python() -> tuple[str, str]:
    """A Python that a TVM's unprivileged task user can run, and this environment's
    site-packages (azure-batch) for it: the test's own interpreter may live where task users
    cannot go (pyenv under /root)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    site = sysconfig.get_paths()["purelib"]
    if python is None:
        pytest.skip("no system python3 for the job manager task")
    probe = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    if probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{python} is not Python {sys.version_info[0]}.{sys.version_info[1]}")
    for p in [site, *Path(site).parents]:
        mode = os.stat(p).st_mode
        if not (mode & stat.S_IXOTH and (p != site or mode & stat.S_IROTH)):
            pytest.skip(f"{p} is not reachable by task users (the job manager imports from {site})")
    return python, site


def test_job_manager_adds_tasks_with_the_sdk_and_its_job_token(client: BatchClient) -> None:
    python, site = _task_python()
    pool_id, sid = uid("jm-pool"), uid("jm")
    client.create_pool(ubuntu_pool(pool_id, 2))
    code = base64.b64encode(MANAGER.encode()).decode()
    cmd = f"{python} -c \"import base64; exec(base64.b64decode('{code}'))\""
    try:
        client.create_job_schedule(
            bm.BatchJobScheduleCreateOptions(
                id=sid,
                schedule=bm.BatchJobScheduleConfiguration(),  # one job, now
                job_specification=bm.BatchJobSpecification(
                    pool_info=bm.BatchPoolInfo(pool_id=pool_id),
                    all_tasks_complete_mode=bm.BatchAllTasksCompleteMode.TERMINATE_JOB,
                    job_manager_task=bm.BatchJobManagerTask(
                        id="manager",
                        command_line=cmd,
                        kill_job_on_completion=False,
                        environment_settings=[bm.EnvironmentSetting(name="PYTHONPATH", value=site)],
                        # 2025-06-01 has no authenticationTokenSettings (older api-versions ask
                        # for access ["job"]): every job manager gets its job's token here.
                    ),
                ),
            )
        )
        job_id = f"{sid}:job-1"

        def done() -> bool:
            try:
                return client.get_job(job_id).state == bm.BatchJobState.COMPLETED
            except ResourceNotFoundError:
                return False

        wait(done, "the schedule's job to complete", timeout=120)
        out = b"".join(client.download_task_file(job_id, "manager", "stdout.txt")).decode()
        err = b"".join(client.download_task_file(job_id, "manager", "stderr.txt")).decode()
        assert "added ['t0', 't1', 't2', 't3']" in out
        assert f"job {job_id}" in out, (out, err)
        assert "pools refused 403" in out, (out, err)
        tasks = {t.id: t for t in client.list_tasks(job_id)}
        assert set(tasks) == {"manager", "t0", "t1", "t2", "t3"}
        for t in tasks.values():
            assert t.execution_info is not None
            assert t.execution_info.result == bm.BatchTaskExecutionResult.SUCCESS
        got = b"".join(client.download_task_file(job_id, "t2", "stdout.txt")).decode()
        assert got == "made by the manager\n"
        assert client.get_job(job_id).execution_info.termination_reason == "AllTasksComplete"
    finally:
        _delete_schedule(client, sid)
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_autoscale_with_modern_names(client: BatchClient) -> None:
    pool_id = uid("as-pool")
    client.create_pool(ubuntu_pool(pool_id))
    try:
        formula = (
            "$TargetDedicatedNodes = min(2, $TaskSlotsPerNode * 2);"
            " $NodeDeallocationOption = taskcompletion; slots = $TaskSlotsPerNode;"
        )
        client.enable_pool_auto_scale(
            pool_id,
            bm.BatchPoolEnableAutoScaleOptions(
                auto_scale_formula=formula,
                auto_scale_evaluation_interval=dt.timedelta(minutes=5),
            ),
        )
        pool = client.get_pool(pool_id)
        assert pool.enable_auto_scale is True
        assert pool.auto_scale_evaluation_interval == dt.timedelta(minutes=5)
        assert pool.auto_scale_run is not None
        assert pool.auto_scale_run.results == (
            "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;"
            "$NodeDeallocationOption=taskcompletion;slots=1"
        )

        def two_nodes() -> bool:
            return client.get_pool(pool_id).current_dedicated_nodes == 2

        wait(two_nodes, "autoscale to reach two nodes", timeout=90)
        run = client.evaluate_pool_auto_scale(
            pool_id,
            bm.BatchPoolEvaluateAutoScaleOptions(
                auto_scale_formula="$TargetDedicatedNodes = $CurrentDedicatedNodes"
                " + $TargetLowPriorityNodes; busy = $PendingTasks.Count() + $RunningTasks.Count()"
                " + $ActiveTasks.Count() + $CPUPercent.Count() + $MemoryBytes.Count() >= 0;"
            ),
        )
        assert run.results == (
            "$TargetDedicatedNodes=2;$TargetLowPriorityNodes=0;$NodeDeallocationOption=requeue;busy=1"
        )
        assert run.error is None
        client.disable_pool_auto_scale(pool_id)
        pool = client.get_pool(pool_id)
        assert pool.enable_auto_scale is False
        assert pool.target_dedicated_nodes == 2
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()
