"""The dashboard's JSON views against a real coordinator and agent: the job's task table (failures
first, filters, pages), the stdout tail by byte offset, and a pool's autoscale runs."""

from __future__ import annotations

import sys

import httpx2

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.ui.uihelp import logged_in

JOB = "job-0000000001"
BIG = 100_000  # bytes of stdout: more than one 64 KiB tail chunk


async def test_task_table_tail_and_autoscale_runs(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path, agents=1) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        big = f"{sys.executable} -c \"import sys; sys.stdout.write('x' * {BIG - 1} + 'E')\""
        specs = [task_spec(f"ok{i}", "true") for i in range(3)]
        specs += [task_spec(f"bad{i}", "sh -c 'exit 4'") for i in range(3)]
        specs.append(task_spec("big", big))
        await c.client.tasks.add_many("wi", JOB, specs)
        await c.wait_for(lambda: _all_done(c), what="all tasks completed")
        hdrs = await logged_in(http, c.client)

        async def tasks(q: str) -> dict:
            r = await http.get(f"/ui/api/tasks/wi/{JOB}?{q}", headers=hdrs)
            assert r.status_code == 200, r.text
            return r.json()

        page0 = await tasks("size=2")
        assert page0["total"] == 7
        assert [t["name"] for t in page0["tasks"]] == ["bad0", "bad1"]  # failures first
        page1 = await tasks("size=2&page=1")
        assert [t["name"] for t in page1["tasks"]] == ["bad2", "big"]
        failed = await tasks("state=failed")
        assert {t["name"] for t in failed["tasks"]} == {"bad0", "bad1", "bad2"}
        assert {t["exitCode"] for t in failed["tasks"]} == {4}
        assert (await tasks("state=succeeded&q=ok"))["total"] == 3
        assert (await tasks("state=running"))["tasks"] == []
        assert (await tasks("page=9"))["tasks"] == []

        # A task's history: added, running, completed, in that order.
        one = (await http.get(f"/ui/api/view/task/wi/{JOB}/bad0", headers=hdrs)).json()
        assert [e["event"] for e in one["history"]] == ["added", "running", "completed"]
        assert [e["time"] for e in one["history"]] == sorted(e["time"] for e in one["history"])

        job = (await http.get(f"/ui/api/view/job/wi/{JOB}", headers=hdrs)).json()
        assert job["counts"] == {
            "active": 0,
            "running": 0,
            "completed": 7,
            "succeeded": 4,
            "failed": 3,
        }

        # The tail: the last 64 KiB first, then from a byte offset onwards.
        url = f"/ui/api/file/wi/{JOB}/big/stdout.txt"
        tail = (await http.get(url, headers=hdrs)).json()
        assert tail["size"] == BIG
        assert tail["next"] == BIG
        assert tail["offset"] == BIG - 64 * 1024
        assert tail["text"].endswith("xE")
        more = (await http.get(f"{url}?offset={tail['next']}", headers=hdrs)).json()
        assert (more["text"], more["next"]) == ("", BIG)
        head = (await http.get(f"{url}?offset=0", headers=hdrs)).json()
        assert (head["offset"], head["next"]) == (0, 64 * 1024)
        r = await http.get(f"{url}?offset=-1", headers=hdrs)
        assert r.status_code == 400
        empty = (await http.get(f"/ui/api/file/wi/{JOB}/ok0/stderr.txt", headers=hdrs)).json()
        assert (empty["text"], empty["size"]) == ("", 0)

        # Autoscale: the run's $TargetDedicatedNodes is picked out for the plot.
        await c.client.pools.add(
            "auto",
            enable_auto_scale=True,
            auto_scale_formula="$TargetDedicatedNodes = 0;",
            auto_scale_evaluation_interval="PT5M",
        )
        pool = (await http.get("/ui/api/view/pool/auto", headers=hdrs)).json()
        assert [r["target"] for r in pool["autoscaleRuns"]] == [0.0]
        assert pool["pool"]["enableAutoScale"] is True
        p = (await http.get("/ui/api/view/pool/p", headers=hdrs)).json()
        assert [t["state"] for t in p["tvms"]] == ["idle"]
        assert isinstance(p["tvms"][0]["degradedModes"], list)


async def _all_done(c) -> bool:
    counts = await c.client.jobs.task_counts("wi", JOB)
    return counts.completed == 7
