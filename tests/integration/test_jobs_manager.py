"""Issue 6: job-manager tasks on real agents — the JM adds tasks with the Python client and its
job-scoped credential; a lost JM is restarted elsewhere ahead of other tasks."""

from __future__ import annotations

import json
import os
import sys

from coordinator.common import models as m
from tests.harness import REPO, cluster_ctx

J1 = "job-0000000001"

# Runs inside the job manager task: the environment carries the endpoint and a job-scoped token.
MANAGER = r"""
import json, os, sys
from coordinator.client import BatchError, Client, task_spec
c = Client()
wi, job = os.environ["TVM_WORKITEM_NAME"], os.environ["TVM_JOB_NAME"]
res = c.tasks.add_many(wi, job, [task_spec(f"t{i:02d}", sys.executable + " -c pass") for i in range(50)])
out = {"added": sum(r.status == "success" for r in res), "env": {k: os.environ.get(k, "") for k in
       ("TVM_ENDPOINT", "TVM_ACCOUNT", "AZ_BATCH_ACCOUNT_URL")}, "token": bool(os.environ.get("TVM_JOB_TOKEN"))}
try:
    c.jobs.get("other", "job-0000000001")
    out["other"] = "allowed"
except BatchError as e:
    out["other"] = [e.status, e.code]
try:
    c.pools.list()
    out["pools"] = "allowed"
except BatchError as e:
    out["pools"] = [e.status, e.code]
print(json.dumps(out))
"""


async def test_job_manager_adds_50_tasks_and_job_completes_when_done(nursery, tmp_path):
    script = tmp_path / "manager.py"
    script.write_text(MANAGER)
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=2.0) as c:
        await c.pool_with_tvms("p", 2, max_tasks_per_vm=2, vm_size="medium")
        await c.client.workitems.add("other", "p")
        jm = m.JobManager(
            name="manager", command_line=f"{sys.executable} {script}", kill_job_on_completion=False
        )
        await c.client.workitems.add(
            "wi",
            "p",
            job_manager=jm,
            on_all_tasks_complete="terminatejob",
            common_environment_settings=[m.EnvironmentSetting(name="PYTHONPATH", value=REPO)],
        )

        async def job_done() -> bool:
            return (await c.client.jobs.get("wi", J1)).state == "completed"

        await c.wait_for(job_done, timeout=90, what="job completed")
        job = await c.client.jobs.get("wi", J1)
        assert job.execution_info.terminate_reason == "AllTasksComplete"
        assert job.task_counts.completed == 51
        assert job.task_counts.succeeded == 51, await c.client.files.get_from_task(
            "wi", J1, "manager", "stderr.txt"
        )
        out = json.loads(await c.client.files.get_from_task("wi", J1, "manager", "stdout.txt"))
        assert out["added"] == 50
        assert out["token"] is True
        assert out["env"]["TVM_ENDPOINT"] == c.rc.endpoint == out["env"]["AZ_BATCH_ACCOUNT_URL"]
        assert out["env"]["TVM_ACCOUNT"] == c.rc.account
        assert out["other"] == [
            403,
            "AuthorizationFailure",
        ]  # the credential is scoped to its own job
        assert out["pools"] == [403, "AuthorizationFailure"]
        # runExclusive: nothing else ran on the manager's TVM while it ran (it ran first).
        tasks = await c.client.tasks.list("wi", J1)
        manager = next(t for t in tasks if t.name == "manager")
        first = min(t.execution_info.start_time for t in tasks if t.name != "manager")
        assert manager.execution_info.start_time < first
        assert (await c.client.workitems.get("wi")).state == "completed"


async def test_killing_the_managers_agent_restarts_it_elsewhere_first(nursery, tmp_path):
    sleep = f'{sys.executable} -c "import time; time.sleep(120)"'
    async with cluster_ctx(nursery, tmp_path, agents=2, heartbeat_timeout=1.0) as c:
        await c.pool_with_tvms("p", 2)
        await c.client.workitems.add(
            "wi", "p", job_manager=m.JobManager(name="manager", command_line=sleep)
        )
        await c.client.tasks.add_collection(
            "wi", J1, [m.TaskAdd(name=f"t{i}", command_line=sleep) for i in range(3)]
        )

        async def task(name: str) -> m.Task:
            return await c.client.tasks.get("wi", J1, name)

        async def placed() -> bool:
            return (await task("manager")).state == "running" and (
                await task("t0")
            ).state == "running"

        await c.wait_for(placed, timeout=30, what="manager and t0 running")
        first_tvm = (await task("manager")).tvm_info.tvm_name
        other_tvm = (await task("t0")).tvm_info.tvm_name
        assert first_tvm != other_tvm
        agent_id = (await c.client.tvms.get("p", first_tvm)).agent_id
        victim = next(a for a in c.agents if _agent_id(a) == agent_id)
        victim.kill()

        async def moved() -> bool:
            t = await task("manager")
            return t.state == "running" and t.tvm_info.tvm_name == other_tvm

        await c.wait_for(moved, timeout=30, what="manager restarted on the other TVM")
        manager, t0 = await task("manager"), await task("t0")
        assert manager.execution_info.requeue_count == 1
        # t0 (same job, equal priority) was requeued to make room; nothing else runs beside the manager.
        assert t0.state == "active"
        assert t0.execution_info.requeue_count == 1
        assert [(await task(f"t{i}")).state for i in range(3)] == ["active"] * 3
        await c.client.jobs.terminate("wi", J1)


def _agent_id(a) -> str:  # noqa: ANN001
    """`--name` is the agent id; older agents kept a generated one in ROOT/agent-id."""
    path = os.path.join(a.root, "agent-id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return a.name
