"""Issue 6: the `tvm workitem|job` operation commands as subprocesses against a real coordinator."""

from __future__ import annotations

from tests.harness import cluster_ctx
from tests.integration.test_cli import _env, tvm, tvm_json

J1 = "job-0000000001"


async def test_workitem_and_job_commands(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0, heartbeat_timeout=2.0) as c:
        env = _env(
            {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        )
        bad = await tvm(
            "workitem", "add", "wi", "--pool", "p", "--recurrence", "PT30S", env=env, ok=False
        )
        assert bad.returncode != 0
        assert b"recurrenceInterval must be at least 1 minute" in bad.stderr + bad.stdout
        wi = await tvm_json(
            "workitem",
            "add",
            "wi",
            "--pool",
            "p",
            "--priority",
            "5",
            "--job-manager",
            "/bin/true",
            "--no-kill-job-on-completion",
            "--max-wall-clock",
            "PT1H",
            "--max-parallel-tasks",
            "3",
            env=env,
        )
        assert wi["jobManager"]["killJobOnCompletion"] is False
        assert wi["maxParallelTasks"] == 3
        job = await tvm_json("job", "update", "wi", J1, "--priority", "700", env=env)
        assert job["priority"] == 700
        assert job["maxParallelTasks"] == 3
        job = await tvm_json("job", "update", "wi", J1, "--max-parallel-tasks", "-1", env=env)
        assert "maxParallelTasks" not in job  # -1, the default, is left out
        assert job["priority"] == 700
        bad = await tvm("job", "update", "wi", J1, "--max-parallel-tasks", "0", env=env, ok=False)
        assert bad.returncode != 0
        assert b"maxParallelTasks must be -1 (no limit) or at least 1" in bad.stderr + bad.stdout
        await tvm("job", "disable", "wi", J1, "--tasks", "wait", env=env)
        assert (await c.client.jobs.get("wi", J1)).state in ("disabling", "disabled")
        await tvm("job", "enable", "wi", J1, env=env)
        await tvm("workitem", "update", "wi", "--priority", "-3", env=env)
        assert (await c.client.workitems.get("wi")).priority == -3
        wi = await tvm_json("workitem", "update", "wi", "--max-parallel-tasks", "7", env=env)
        assert wi["maxParallelTasks"] == 7
        assert wi["priority"] == -3
        await tvm("job", "terminate", "wi", J1, "--reason", "from the CLI", env=env)
        job = await c.client.jobs.get("wi", J1)
        assert job.execution_info.terminate_reason == "from the CLI"
        await tvm("job", "delete", "wi", J1, env=env)
        assert await c.client.jobs.list("wi") == []
        await tvm("workitem", "add", "w2", "--pool", "p", env=env)
        await tvm("workitem", "disable", "w2", env=env)
        assert (await c.client.workitems.get("w2")).state == "disabled"
        await tvm("workitem", "enable", "w2", env=env)
        await tvm("workitem", "terminate", "w2", env=env)
        assert (await c.client.workitems.get("w2")).state in ("terminating", "completed")
