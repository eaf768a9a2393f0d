"""Issue 3: a real coordinator and two real agent processes run 200 tasks end to end."""

import json
import os
import sys

from coordinator.client import task_spec
from tests.harness import cluster_ctx

SCRIPT = (
    "import json, os, sys; "
    "keys = [k for k in os.environ if k.startswith(('WATASK_', 'AZ_BATCH_'))]; "
    "print(json.dumps({k: os.environ[k] for k in keys})); "
    "print('err', file=sys.stderr); sys.exit(int(sys.argv[1]) % 7)"
)

SEED_VARS = [
    "WATASK_ACCOUNT_NAME",
    "WATASK_WORKITEM_NAME",
    "WATASK_JOB_NAME",
    "WATASK_TASK_NAME",
    "WATASK_POOL_NAME",
    "WATASK_TVM_NAME",
    "WATASK_TVM_ROOT_DIR",
    "WATASK_PORTRANGE_LOW",
    "WATASK_PORTRANGE_HIGH",
]


async def test_two_hundred_tasks_on_two_agents(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        await c.pool_with_tvms("p1", 2, max_tasks_per_vm=2, vm_size="medium")
        await c.client.workitems.add("wi", "p1")
        job = "job-0000000001"
        specs = [task_spec(f"t{i:03d}", f'{sys.executable} -c "{SCRIPT}" {i}') for i in range(200)]
        results = await c.client.tasks.add_many("wi", job, specs)
        assert all(r.status == "success" for r in results)
        counts = await c.client.tasks.wait("wi", job, timeout=120)
        assert counts.completed == 200
        assert counts.failed == sum(1 for i in range(200) if i % 7)
        tasks = {t.name: t for t in await c.client.tasks.list("wi", job)}
        tvm_names = {t.name for t in await c.client.tvms.list("p1")}
        used = set()
        for i in (0, 1, 7, 50, 199):
            t = tasks[f"t{i:03d}"]
            assert t.state == "completed"
            assert t.execution_info.exit_code == i % 7
            out = await c.client.files.get_from_task("wi", job, t.name, "stdout.txt")
            env = json.loads(out)
            for var in SEED_VARS:
                assert var in env, var
            assert env["WATASK_TASK_NAME"] == t.name
            assert env["WATASK_WORKITEM_NAME"] == "wi"
            assert env["WATASK_JOB_NAME"] == job
            assert env["WATASK_POOL_NAME"] == "p1"
            assert env["WATASK_ACCOUNT_NAME"] == c.rc.account
            assert env["WATASK_TVM_NAME"] == t.tvm_info.tvm_name
            assert env["AZ_BATCH_TASK_ID"] == t.name
            assert env["AZ_BATCH_POOL_ID"] == "p1"
            assert env["WATASK_TVM_ROOT_DIR"] in {os.path.abspath(a.root) for a in c.agents}
            used.add(t.tvm_info.tvm_name)
            assert await c.client.files.get_from_task("wi", job, t.name, "stderr.txt") == b"err\n"
        assert used <= tvm_names
        assert {t.tvm_info.tvm_name for t in tasks.values()} == tvm_names  # both TVMs worked
        # shared/ and start/ exist on every TVM
        for tvm in tvm_names:
            names = {f.name for f in await c.client.files.list_from_tvm("p1", tvm)}
            assert {"shared", "start", "tasks"} <= names
        # byte range of a task file
        part = await c.client.files.get_from_task(
            "wi", job, "t000", "stderr.txt", byte_range=(0, 1)
        )
        assert part == b"er"


async def test_pack_fill_uses_one_tvm_first(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        await c.pool_with_tvms("p", 2, max_tasks_per_vm=4, vm_size="medium", tvm_fill_type="pack")
        await c.client.workitems.add("wi", "p")
        specs = [task_spec(f"t{i}", "sleep 1") for i in range(3)]
        await c.client.tasks.add_many("wi", "job-0000000001", specs)
        await c.wait_for(lambda: _running(c), what="3 running tasks")
        tasks = await c.client.tasks.list("wi", "job-0000000001")
        assert len({t.tvm_info.tvm_name for t in tasks}) == 1
        await c.client.tasks.wait("wi", "job-0000000001", timeout=30)


async def _running(c):
    return len(await c.client.tasks.list("wi", "job-0000000001", state="running")) == 3


async def test_wrong_join_token_is_refused_and_server_keeps_serving(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        bad = c.start_agent("intruder", token="not-the-token")
        await c.wait_for(
            lambda: bad.proc.poll() is not None, timeout=20, what="refused agent to exit"
        )
        assert bad.proc.returncode == 2
        assert "InvalidJoinToken" in bad.log_text()
        good = c.start_agent("good")
        await c.pool_with_tvms("p", 1)
        assert good.proc.poll() is None
