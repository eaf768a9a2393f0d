"""What a job manager's job-scoped token (TVMJobToken, or Bearer as the Azure SDKs send it) reaches
through the newer features: another job's tasks, dependencies and task arrays (seed and Azure
routes), the coordinator's file store (list, download by hash, upload), agent tokens. Only its own
job answers. A real coordinator over HTTP."""

from __future__ import annotations

import httpx2

from tests.harness import cluster_ctx

JOB = "job-0000000001"
AZ = "api-version=2024-02-01.19.0"


async def test_a_job_token_reaches_its_own_job_only(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        await c.client.workitems.add("mine", "p", uses_task_dependencies=True)
        await c.client.workitems.add("other", "p", uses_task_dependencies=True)
        await c.client.tasks.add("other", JOB, "1", "/bin/true")
        stored = await c.client.files.upload(b"another job's input")
        token = c.rc.service.core.get_job("mine", JOB).rec.token
        base = c.rc.endpoint.rstrip("/")
        task = {"name": "2", "commandLine": "/bin/true", "dependsOn": {"taskIds": ["1"]}}
        az_task = {"id": "2", "commandLine": "/bin/true", "dependsOn": {"taskIds": ["1"]}}
        async with httpx2.AsyncClient(timeout=30) as http:
            for scheme in ("TVMJobToken", "Bearer"):
                auth = {"Authorization": f"{scheme} {token}"}

                async def call(
                    method: str,
                    path: str,
                    body: object = None,
                    q: str = "",
                    auth: dict[str, str] = auth,
                ):  # noqa: ANN202
                    url = f"{base}{path}{'?' + q if q else ''}"
                    return await http.request(method, url, headers=auth, json=body)

                refused = [
                    await call("POST", f"/workitems/other/jobs/{JOB}/tasks", task),
                    await call(
                        "POST", f"/workitems/other/jobs/{JOB}/addtaskcollection", {"value": [task]}
                    ),
                    await call("GET", f"/workitems/other/jobs/{JOB}/tasks/1"),
                    await call("POST", "/jobs/other/tasks", az_task, AZ),
                    await call("POST", "/jobs/other/addtaskcollection", {"value": [az_task]}, AZ),
                    await call("GET", "/jobs/other/tasks", q=AZ),
                    await call("GET", "/files"),
                    await call("GET", f"/files/sha256/{stored['sha256']}"),
                    await call("POST", "/files", None),
                    await call("GET", "/agenttokens"),
                    await call("POST", "/agenttokens", {}),
                    await call("POST", "/workitems", {"name": "x", "poolName": "p"}),
                ]
                for r in refused:
                    assert r.status_code == 403, (r.request.url, r.status_code, r.text)
                    assert "AuthorizationFailure" in r.text, r.text
                # Its own job: a dependency on a task of another job is just an unknown id.
                own = await call("POST", f"/workitems/mine/jobs/{JOB}/tasks", task)
                assert own.status_code == 400, own.text
                assert own.json()["code"] == "TaskDependencyNotFound"
                sneaky = dict(task, dependsOn={"taskIds": ["../../other/jobs/job-0000000001/1"]})
                own = await call("POST", f"/workitems/mine/jobs/{JOB}/tasks", sneaky)
                assert own.status_code == 400, own.text
            assert not c.rc.service.core.get_job("mine", JOB).tasks
            assert list(c.rc.service.core.get_job("other", JOB).tasks) == ["1"]
