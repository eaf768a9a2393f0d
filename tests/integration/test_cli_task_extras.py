"""`tvm task add` with output files (to the file store), slots and a multi-instance task, through the
CLI process against a real coordinator and agent; a refused value exits 1 with the reason."""

from __future__ import annotations

import json

from tests.harness import cluster_ctx
from tests.integration.test_cli import _env, tvm, tvm_json

JOB = "job-0000000001"


async def test_task_add_output_files_slots_and_instances(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        env = _env(
            {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        )
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.pool_with_tvms("mpi", 1, communication=True)
        await c.client.workitems.add("wi", "p")
        await c.client.workitems.add("wm", "mpi")
        await tvm_json(
            "task", "add", "wi", JOB, "t", "sh -c 'echo result > r.txt'",
            "--output-file", "r.txt", "--output-path", "out/r.txt",
            "--upload-condition", "tasksuccess", "--slots", "2",
            env=env,
        )  # fmt: skip
        await tvm_json(
            "task", "add", "wm", JOB, "m", "sh -c 'echo app'",
            "--instances", "1", "--coordination", "true",
            env=env,
        )  # fmt: skip
        await c.client.tasks.wait("wi", JOB, timeout=60)
        await c.client.tasks.wait("wm", JOB, timeout=60)
        t = await tvm_json("task", "show", "wi", JOB, "t", env=env)
        assert t["requiredSlots"] == 2
        assert t["executionInfo"]["exitCode"] == 0
        (res,) = t["outputFileResults"]
        assert (res["path"], res["size"]) == ("out/r.txt", 7)
        assert await c.client.files.download(res["sha256"]) == b"result\n"
        mt = await tvm_json("task", "show", "wm", JOB, "m", env=env)
        assert (
            mt["multiInstanceSettings"]["coordinationCommandLine"] == "true"
        )  # 1 instance: default
        assert mt["executionInfo"]["exitCode"] == 0
        assert [s["id"] for s in mt["subtasks"]] == [0]

        r = await tvm("task", "add", "wi", JOB, "big", "true", "--slots", "9", env=env, ok=False)
        assert r.returncode == 1
        assert "requiredSlots is 9" in r.stderr.decode()
        assert "big" not in json.dumps(await tvm_json("task", "list", "wi", JOB, env=env))

        # --affinity: the TVM's name, shown back; a bad one refused with the reason.
        (tvm_name,) = [t.name for t in await c.client.tvms.list("p")]
        await tvm("task", "add", "wi", JOB, "near", "true", "--affinity", tvm_name, env=env)
        await c.client.tasks.wait("wi", JOB, timeout=60)
        near = await tvm_json("task", "show", "wi", JOB, "near", env=env)
        assert near["affinityId"] == tvm_name
        assert near["tvmInfo"]["tvmName"] == tvm_name
        r = await tvm(
            "task", "add", "wi", JOB, "far", "true", "--affinity", "x" * 129, env=env, ok=False
        )
        assert r.returncode == 1
        assert "affinityId must be a TVM's name" in r.stderr.decode()
