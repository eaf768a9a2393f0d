"""Compute nodes and files through the Azure routes, with a real agent: the node views, node
operations, node counts, supported images, the node file layout Azure clients expect
(`startup/`, `workitems/{job}/job-1/{task}/`) and the AZ_BATCH_* variables a task sees."""

from __future__ import annotations

from typing import Any

from tests.azure.wire import AV, azure_err, pool_body
from tests.harness import cluster_ctx
from tests.integration.test_rest_bad_input import Raw

TASK_CMD = (
    "/bin/sh -c 'echo $AZ_BATCH_JOB_ID $AZ_BATCH_TASK_ID; "
    'test "$AZ_BATCH_TASK_SHARED_DIR" = "$AZ_BATCH_TASK_DIR" && echo shared; echo x > extra.txt\''
)


async def test_nodes_files_and_task_environment(nursery: Any, tmp_path: Any) -> None:
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        api = Raw(c.rc.endpoint, c.rc.account, c.rc.key)
        try:
            body = pool_body("np", targetDedicatedNodes=1)
            body["startTask"] = {"commandLine": "/bin/sh -c 'echo started'", "waitForSuccess": True}
            assert (await api("POST", "/pools", body, query=AV)).status_code == 201

            async def idle_nodes() -> list[dict] | None:
                r = await api(
                    "GET", "/pools/np/nodes", query=AV + "&%24filter=state%20eq%20%27idle%27"
                )
                nodes = r.json()["value"]
                return nodes if len(nodes) == 1 else None

            (node,) = await c.wait_for(idle_nodes, what="an idle node")
            nid = node["id"]
            assert node["url"].endswith(f"/pools/np/nodes/{nid}")
            assert node["vmSize"] == "standard_d2s_v3"
            assert node["isDedicated"] is True
            assert node["startTaskInfo"]["result"] == "success"
            assert node["schedulingState"] == "enabled"

            await api("POST", "/jobs", {"id": "fj", "poolInfo": {"poolId": "np"}}, query=AV)
            r = await api("POST", "/jobs/fj/tasks", {"id": "t1", "commandLine": TASK_CMD}, query=AV)
            assert r.status_code == 201, r.text

            async def done() -> dict | None:
                t = (await api("GET", "/jobs/fj/tasks/t1", query=AV)).json()
                return t if t["state"] == "completed" else None

            task = await c.wait_for(done, what="task t1 completed")
            assert task["executionInfo"]["result"] == "success"
            info = task["nodeInfo"]
            assert (info["poolId"], info["nodeId"]) == ("np", nid)
            assert info["taskRootDirectory"] == "workitems/fj/job-1/t1"

            r = await api("GET", "/jobs/fj/tasks/t1/files/stdout.txt", query=AV)
            assert r.status_code == 200
            assert r.text.splitlines() == ["fj t1", "shared"]
            r = await api("HEAD", "/jobs/fj/tasks/t1/files/stdout.txt", query=AV)
            assert r.status_code == 200
            assert r.headers["ocp-batch-file-url"].endswith("/jobs/fj/tasks/t1/files/stdout.txt")
            assert r.headers["ocp-batch-file-isdirectory"] == "false"
            assert r.headers["content-length"] == r.headers["ocp-content-length"] == "13"
            names = [
                f["name"]
                for f in (await api("GET", "/jobs/fj/tasks/t1/files", query=AV)).json()["value"]
            ]
            assert {"stdout.txt", "stderr.txt"} <= set(names)
            azure_err(
                await api("GET", "/jobs/fj/tasks/t1/files/nope.txt", query=AV), 404, "FileNotFound"
            )

            r = await api("GET", f"/pools/np/nodes/{nid}/files", query=AV + "&recursive=true")
            files = {f["name"]: f for f in r.json()["value"]}
            assert "startup/stdout.txt" in files
            assert "workitems/fj/job-1/t1/stdout.txt" in files
            assert files["startup/stdout.txt"]["properties"]["contentLength"] == "8"
            r = await api("GET", f"/pools/np/nodes/{nid}/files/startup/stdout.txt", query=AV)
            assert r.text == "started\n"
            r = await api(
                "GET", f"/pools/np/nodes/{nid}/files/workitems/fj/job-1/t1/stdout.txt", query=AV
            )
            assert r.text.startswith("fj t1")

            # Deleting files: one file at a time, directories stay (409), then 404.
            r = await api("DELETE", "/jobs/fj/tasks/t1/files/wd/extra.txt", query=AV)
            assert r.status_code == 200, r.text
            azure_err(
                await api("GET", "/jobs/fj/tasks/t1/files/wd/extra.txt", query=AV),
                404,
                "FileNotFound",
            )
            azure_err(
                await api("DELETE", "/jobs/fj/tasks/t1/files/wd", query=AV), 409, "FileIsDirectory"
            )
            r = await api(
                "DELETE", f"/pools/np/nodes/{nid}/files/workitems/fj/job-1/t1/stderr.txt", query=AV
            )
            assert r.status_code == 200, r.text
            r = await api("HEAD", "/jobs/fj/tasks/t1/files/stderr.txt", query=AV)
            assert r.status_code == 404
            assert r.headers["x-ms-error-code"] == "FileNotFound"

            got = (await api("GET", f"/pools/np/nodes/{nid}", query=AV)).json()
            assert (got["totalTasksRun"], got["totalTasksSucceeded"]) == (1, 1)

            login = (
                await api("GET", f"/pools/np/nodes/{nid}/remoteloginsettings", query=AV)
            ).json()
            assert login["remoteLoginIPAddress"] == node["ipAddress"]
            assert login["remoteLoginPort"] == 22

            counts = (await api("GET", "/nodecounts", query=AV)).json()["value"]
            mine = next(x for x in counts if x["poolId"] == "np")
            assert mine["dedicated"]["idle"] == 1
            assert mine["dedicated"]["total"] == 1
            assert mine["lowPriority"]["total"] == 0

            images = (await api("GET", "/supportedimages", query=AV)).json()["value"]
            assert images
            assert {i["osType"] for i in images} == {"linux"}

            r = await api(
                "POST",
                f"/pools/np/nodes/{nid}/disablescheduling",
                {"nodeDisableSchedulingOption": "taskcompletion"},
                query=AV,
            )
            assert r.status_code == 200, r.text
            got = (await api("GET", f"/pools/np/nodes/{nid}", query=AV)).json()
            assert got["schedulingState"] == "disabled"
            assert (
                await api("POST", f"/pools/np/nodes/{nid}/enablescheduling", query=AV)
            ).status_code == 200
            r = await api(
                "POST",
                f"/pools/np/nodes/{nid}/disablescheduling",
                {"nodeDisableSchedulingOption": "sometimes"},
                query=AV,
            )
            assert r.status_code == 400
            azure_err(await api("GET", "/pools/np/nodes/nope", query=AV), 404, "NodeNotFound")
        finally:
            await api.http.aclose()
