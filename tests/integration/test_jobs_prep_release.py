"""Job preparation and release tasks with real agents: the preparation runs once per TVM before the
job's tasks there and they read what it left; a failing one keeps the tasks off its TVM; the release
runs on every TVM that ran the preparation when the job ends; bad requests leave nothing behind."""

from __future__ import annotations

import shlex

import pytest
import trio

from coordinator.client import BatchError, task_spec
from coordinator.common import models as m
from tests.harness import cluster_ctx

JOB = "job-0000000001"


def sh(script: str) -> str:
    return f"/bin/sh -c {shlex.quote(script)}"


PREP_CMD = sh(
    "echo prepared-on-$AZ_BATCH_NODE_ID > marker.txt; "
    'echo "$AZ_BATCH_TASK_ID" >> "$AZ_BATCH_NODE_SHARED_DIR/prep-runs"'
)
TASK_CMD = sh('cat "$AZ_BATCH_JOB_PREP_WORKING_DIR/marker.txt"; echo "dir=$AZ_BATCH_JOB_PREP_DIR"')
RELEASE_CMD = sh(
    'echo "$AZ_BATCH_TASK_ID $(cat "$AZ_BATCH_JOB_PREP_WORKING_DIR/marker.txt")" '
    '>> "$AZ_BATCH_NODE_SHARED_DIR/release-runs"'
)


async def _status(c, wi: str = "wi"):  # noqa: ANN001, ANN202
    return await c.client.jobs.prep_release_status(wi, JOB)


async def test_prep_runs_once_per_tvm_and_release_at_job_end(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        await c.pool_with_tvms("p", 2)
        await c.client.workitems.add(
            "wi",
            "p",
            job_preparation_task=m.JobPreparationTask(command_line=PREP_CMD),
            job_release_task=m.JobReleaseTask(command_line=RELEASE_CMD),
        )
        # One collection: the first placement deals a task to each TVM, so both prepare.
        specs = [task_spec(f"t{i}", TASK_CMD) for i in range(6)]
        assert {r.status for r in await c.client.tasks.add_many("wi", JOB, specs)} == {"success"}
        counts = await c.client.tasks.wait("wi", JOB, timeout=60)
        assert counts.succeeded == 6, counts
        tvms = {t.name for t in await c.client.tvms.list("p")}
        used = set()
        for i in range(6):
            task = await c.client.tasks.get("wi", JOB, f"t{i}")
            tvm = task.tvm_info.tvm_name
            used.add(tvm)
            out = (await c.client.files.get_from_task("wi", JOB, f"t{i}", "stdout.txt")).decode()
            lines = out.split()
            # The task read the preparation's output on its own TVM, through the variables.
            assert lines[0] == f"prepared-on-{tvm}", out
            assert lines[1].endswith(f"/tasks/wi/{JOB}/jobpreparation"), out
        status = await _status(c)
        assert {s.tvm_name for s in status} == tvms
        assert used <= tvms
        for s in status:
            prep = s.job_preparation_task_execution_info
            assert (prep.state, prep.exit_code, prep.result, prep.retry_count) == (
                "completed",
                0,
                "success",
                0,
            )
            assert prep.task_root_directory == f"tasks/wi/{JOB}/jobpreparation"
            assert s.job_release_task_execution_info is None
            runs = await c.client.files.get_from_tvm("p", s.tvm_name, "shared/prep-runs")
            assert runs.decode().split() == ["jobpreparation"]  # once on this TVM

        await c.client.jobs.terminate("wi", JOB)

        async def released():  # noqa: ANN202
            job = await c.client.jobs.get("wi", JOB)
            return job if job.state == "completed" else None

        await c.wait_for(released, what="the job completed after its release tasks")
        for s in await _status(c):
            rel = s.job_release_task_execution_info
            assert rel is not None
            assert (rel.state, rel.exit_code, rel.result) == ("completed", 0, "success")
            out = await c.client.files.get_from_tvm("p", s.tvm_name, "shared/release-runs")
            assert out.decode().split() == ["jobrelease", f"prepared-on-{s.tvm_name}"]


async def test_failing_prep_keeps_tasks_off_its_tvm(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        prep = m.JobPreparationTask(
            command_line=sh("echo trying; exit 3"),
            task_constraints=m.TaskConstraints(max_task_retry_count=1),
        )
        await c.client.workitems.add("wi", "p", job_preparation_task=prep)
        await c.client.tasks.add("wi", JOB, "t", "/bin/true")

        async def failed():  # noqa: ANN202
            status = await _status(c)
            info = status[0].job_preparation_task_execution_info if status else None
            return info if info is not None and info.state == "completed" else None

        info = await c.wait_for(failed, what="the preparation task failed")
        assert (info.exit_code, info.retry_count, info.result) == (3, 1, "failure")
        assert info.scheduling_error is None or info.scheduling_error.code != "TaskEnded"
        # Ticks pass (0.4 s each here) and scheduling passes run: the task never starts there.
        await trio.sleep(1.5)
        task = await c.client.tasks.get("wi", JOB, "t")
        assert task.state == "active"
        assert task.tvm_info is None

        # Without waitForSuccess a failing preparation does not hold the tasks.
        lax = m.JobPreparationTask(command_line=sh("exit 5"), wait_for_success=False)
        await c.client.workitems.add("wi2", "p", job_preparation_task=lax)
        await c.client.tasks.add("wi2", JOB, "t", "/bin/true")
        counts = await c.client.tasks.wait("wi2", JOB, timeout=30)
        assert counts.succeeded == 1


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"job_release_task": m.JobReleaseTask(command_line="/bin/true")}, "InvalidPropertyValue"),
        (
            {
                "job_preparation_task": m.JobPreparationTask(command_line="/bin/true"),
                "job_release_task": m.JobReleaseTask(
                    command_line="/bin/true", max_wall_clock_time="PT1H"
                ),
            },
            "InvalidPropertyValue",
        ),
        (
            {
                "job_preparation_task": m.JobPreparationTask(
                    command_line="/bin/true",
                    task_constraints=m.TaskConstraints(retention_time="soon"),
                )
            },
            "InvalidPropertyValue",
        ),
    ],
)
async def test_bad_prep_or_release_is_refused_and_leaves_nothing(nursery, tmp_path, extra, code):
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.pools.add("p", target_dedicated=0)
        with pytest.raises(BatchError) as info:
            await c.client.workitems.add("wi", "p", **extra)
        assert info.value.status == 400
        assert info.value.code == code
        assert await c.client.workitems.list() == []


async def test_task_with_the_prep_id_is_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.pools.add("p", target_dedicated=0)
        await c.client.workitems.add(
            "wi", "p", job_preparation_task=m.JobPreparationTask(command_line="/bin/true")
        )
        with pytest.raises(BatchError) as info:
            await c.client.tasks.add("wi", JOB, "jobpreparation", "/bin/true")
        assert (info.value.status, info.value.code) == (409, "TaskIdSameAsJobPreparationTask")
        assert await c.client.tasks.list("wi", JOB) == []
        # A job without a preparation task has no status to show.
        await c.client.workitems.add("plain", "p")
        with pytest.raises(BatchError) as info:
            await c.client.jobs.prep_release_status("plain", JOB)
        assert (info.value.status, info.value.code) == (409, "JobPreparationTaskNotSpecified")
