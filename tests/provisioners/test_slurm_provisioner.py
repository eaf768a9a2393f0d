"""The slurm provisioner against a real single-node Slurm started by the test (its own munge key,
slurm.conf, spool directories and ports): an autoscale formula on $PendingTasks grows a pool by
Slurm jobs, the tasks run on the agents those jobs start, the pool shrinks to nothing and the
Slurm jobs end. A partition that does not exist pauses the provisioner after `max-failures`
submissions, with the reason on the pool."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from coordinator.common import models as m
from coordinator.core import AutoscaleTiming
from coordinator.runtime.provisioners.config import parse_provisioners
from tests.harness import cluster_ctx
from tests.provisioners.hostprocs import agent_pids
from tests.provisioners.slurmctl import Slurm, start_slurm
from tests.provisioners.test_ssh_provisioner import _tvm_command

# Not `slow`: the private Slurm starts in about a second and the whole test takes ~15 s.

FAST = AutoscaleTiming(
    sample_period=0.2, visibility_delay=0.4, min_interval=1.0, enable_throttle=0.0
)
FORMULA = """
$tasks = max(0, $PendingTasks.GetSample(1));
$TargetDedicatedNodes = min($tasks, 2);
$NodeDeallocationOption = taskcompletion;
"""
JOB = "job-0000000001"


@pytest.fixture
def slurm(tmp_path) -> Iterator[Slurm]:  # noqa: ANN001
    cluster = start_slurm(str(tmp_path / "slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def work_dir() -> Iterator[str]:
    # Outside tmp_path: task users must traverse to their directories (pytest's tmp is 0700).
    path = f"/var/tmp/tvm-slurm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _section(slurm: Slurm, work_dir: str, **extra: object) -> dict:
    return {
        "hpc": {
            "type": "slurm",
            "tvm": _tvm_command(),
            "work-dir": work_dir,
            "slurm-conf": slurm.conf,
            "time-limit": "00:10:00",
            "idle-stop-after": 0.5,
            "max-pending": 2,
            **extra,
        }
    }


def _jobs(slurm: Slurm) -> list[tuple[str, str]]:
    out = slurm.run("squeue", "--noheader", "--states=all", "--name=tvm-hpc", "--format=%i|%T")
    return [tuple(line.split("|")) for line in out.split()]  # type: ignore[misc]


async def test_autoscale_grows_a_pool_by_slurm_jobs_and_shrinks_it(
    nursery, tmp_path, slurm, work_dir
):
    provisioners = parse_provisioners(_section(slurm, work_dir))
    async with cluster_ctx(
        nursery, tmp_path, heartbeat_timeout=5.0, autoscale_timing=FAST, provisioners=provisioners
    ) as c:
        await c.client.pools.add(
            "hpc",
            enable_auto_scale=True,
            auto_scale_formula=FORMULA,
            auto_scale_evaluation_interval="PT1S",
            metadata=[m.MetadataItem(name="provisioner", value="hpc")],
        )
        assert _jobs(slurm) == []
        await c.client.workitems.add("wi", "hpc")
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", "/bin/sh -c 'sleep 2; echo done'") for i in range(4)]
        )
        await c.wait_for(lambda: c._idle("hpc", 2), timeout=90, what="2 TVMs from Slurm jobs")
        tvms = await c.client.tvms.list("hpc")
        agents = {t.agent_id for t in tvms}
        assert all(a.startswith("hpc-") for a in agents)
        jobs = _jobs(slurm)
        assert len(jobs) == 2
        assert {state for _, state in jobs} == {"RUNNING"}
        done = await c.wait_for(lambda: _all_done(c), timeout=90, what="4 tasks completed")
        assert all(t.execution_info.exit_code == 0 for t in done)
        assert {t.tvm_info.tvm_name for t in done} <= {t.name for t in tvms}
        # no pending task: the formula brings the pool to 0, the agents are stopped, the jobs end
        await c.wait_for(
            lambda: (
                not any(state in ("PENDING", "RUNNING", "COMPLETING") for _, state in _jobs(slurm))
            ),
            timeout=90,
            what="every Slurm job ended",
        )
        assert len(_jobs(slurm)) == 2  # the same two jobs, no more were submitted
        pool = await c.client.pools.get("hpc")
        assert pool.target_dedicated == 0
        assert pool.current_dedicated == 0
        await c.wait_for(lambda: not agent_pids(work_dir), what="no agent process left")
        await c.wait_for(lambda: not os.listdir(work_dir), what="the jobs' directories removed")


async def test_failing_allocations_pause_the_provisioner_with_the_reason_on_the_pool(
    nursery, tmp_path, slurm, work_dir
):
    provisioners = parse_provisioners(
        _section(slurm, work_dir, partition="nosuchpartition", **{"max-failures": 2})
    )
    async with cluster_ctx(nursery, tmp_path, provisioners=provisioners) as c:
        await c.client.pools.add(
            "hpc", target_dedicated=3, metadata=[m.MetadataItem(name="provisioner", value="hpc")]
        )
        pool = await c.wait_for(
            lambda: _paused(c), timeout=30, what="the provisioner paused on the pool"
        )
        assert "2 Slurm allocations in a row failed" in pool.resize_error.message
        assert (
            "nosuchpartition" in pool.resize_error.message
            or "partition" in pool.resize_error.message
        )
        assert pool.allocation_state == "steady"
        assert pool.current_dedicated == 0
        assert _jobs(slurm) == []
        assert not os.path.exists(work_dir) or not os.listdir(work_dir)  # nothing half-made


async def _paused(c):  # noqa: ANN001, ANN202
    p = await c.client.pools.get("hpc")
    return p if p.resize_error is not None and p.resize_error.code == "ProvisionerPaused" else None


async def _all_done(c):  # noqa: ANN001, ANN202
    tasks = await c.client.tasks.list("wi", JOB)
    return tasks if len(tasks) == 4 and all(t.state == "completed" for t in tasks) else None
