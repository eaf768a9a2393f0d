"""A job credential lives in its job manager's environment: it must not turn a job manager that runs
as an ordinary task user into root on the pool's TVMs by adding a task that runs elevated. Seed and
Azure routes, single adds and collections (the elevated task refused alone), an elevated job
manager's credential and the account key still allowed. A real coordinator over HTTP."""

from __future__ import annotations

import httpx2

from coordinator.common import models as m
from tests.harness import cluster_ctx

JOB = "job-0000000001"
AZ = "api-version=2024-02-01.19.0"
# Never started in these tests (no agent runs): only the job manager's elevation matters.
JM = "sleep 600"


async def test_a_job_credential_adds_elevated_tasks_only_for_an_elevated_job_manager(
    nursery, tmp_path
):
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.workitems.add(
            "plain", "p", job_manager=m.JobManager(name="jm", command_line=JM)
        )
        await c.client.workitems.add(
            "root", "p", job_manager=m.JobManager(name="jm", command_line=JM, run_elevated=True)
        )
        await c.client.workitems.add("nojm", "p")
        core = c.rc.service.core
        base = c.rc.endpoint.rstrip("/")

        def seed(name: str, elevated: bool) -> dict[str, object]:
            return {"name": name, "commandLine": "/bin/true", "runElevated": elevated}

        def azure(name: str, elevated: bool) -> dict[str, object]:
            level = "admin" if elevated else "nonadmin"
            return {
                "id": name,
                "commandLine": "/bin/true",
                "userIdentity": {"autoUser": {"scope": "task", "elevationLevel": level}},
            }

        async with httpx2.AsyncClient(timeout=30) as http:
            for wi in ("plain", "nojm"):
                token = core.get_job(wi, JOB).rec.token
                for scheme in ("TVMJobToken", "Bearer"):
                    auth = {"Authorization": f"{scheme} {token}"}
                    n = f"{scheme[0]}"
                    refused = [
                        await http.post(
                            f"{base}/workitems/{wi}/jobs/{JOB}/tasks",
                            headers=auth,
                            json=seed(f"s{n}", True),
                        ),
                        await http.post(
                            f"{base}/jobs/{wi}/tasks?{AZ}", headers=auth, json=azure(f"a{n}", True)
                        ),
                    ]
                    for r in refused:
                        assert r.status_code == 403, (r.request.url, r.text)
                        assert "AuthorizationFailure" in r.text, r.text
                        assert "elevated" in r.text, r.text
                    # A collection: the elevated task refused alone, the others added.
                    r = await http.post(
                        f"{base}/workitems/{wi}/jobs/{JOB}/addtaskcollection",
                        headers=auth,
                        json={"value": [seed(f"c{n}1", False), seed(f"c{n}2", True)]},
                    )
                    assert r.status_code == 200, r.text
                    assert [v["status"] for v in r.json()["value"]] == ["success", "clienterror"]
                    assert "AuthorizationFailure" in str(r.json()["value"][1]["error"])
                    r = await http.post(
                        f"{base}/jobs/{wi}/addtaskcollection?{AZ}",
                        headers=auth,
                        json={"value": [azure(f"d{n}1", True), azure(f"d{n}2", False)]},
                    )
                    assert r.status_code == 200, r.text
                    assert [v["status"].lower() for v in r.json()["value"]] == [
                        "clienterror",
                        "success",
                    ]
                    # Not elevated: allowed.
                    r = await http.post(
                        f"{base}/workitems/{wi}/jobs/{JOB}/tasks",
                        headers=auth,
                        json=seed(f"ok{n}", False),
                    )
                    assert r.status_code == 201, r.text
                added = {n for n, t in core.get_job(wi, JOB).tasks.items() if n != "jm"}
                assert added == {"cT1", "dT2", "okT", "cB1", "dB2", "okB"}, added
                assert not any(core.get_job(wi, JOB).tasks[n].run_elevated for n in added)

            # The credential of an elevated job manager may; so may the account key, anywhere.
            token = core.get_job("root", JOB).rec.token
            auth = {"Authorization": f"Bearer {token}"}
            r = await http.post(
                f"{base}/workitems/root/jobs/{JOB}/tasks", headers=auth, json=seed("s", True)
            )
            assert r.status_code == 201, r.text
            r = await http.post(f"{base}/jobs/root/tasks?{AZ}", headers=auth, json=azure("a", True))
            assert r.status_code == 201, r.text
        await c.client.tasks.add("plain", JOB, "bykey", "/bin/true", run_elevated=True)
        assert core.get_job("root", JOB).tasks["s"].run_elevated
        assert core.get_job("root", JOB).tasks["a"].run_elevated
        assert core.get_job("plain", JOB).tasks["bykey"].run_elevated


async def test_a_job_credential_cannot_grow_its_job_past_max_tasks_per_job(nursery, tmp_path):
    """The coordinator's memory is bounded per job: over max-tasks-per-job, 409 JobTaskQuotaReached
    on the seed and Azure routes, a collection's tasks over it refused alone."""
    async with cluster_ctx(nursery, tmp_path, agents=0, max_tasks_per_job=4) as c:
        await c.client.workitems.add(
            "wi", "p", job_manager=m.JobManager(name="jm", command_line=JM)
        )
        core = c.rc.service.core
        auth = {"Authorization": f"Bearer {core.get_job('wi', JOB).rec.token}"}
        base = c.rc.endpoint.rstrip("/")
        async with httpx2.AsyncClient(timeout=30) as http:
            r = await http.post(
                f"{base}/workitems/wi/jobs/{JOB}/addtaskcollection",
                headers=auth,
                json={"value": [{"name": n, "commandLine": "/bin/true"} for n in "abcd"]},
            )
            assert r.status_code == 200, r.text
            statuses = [v["status"] for v in r.json()["value"]]
            assert statuses == ["success", "success", "success", "clienterror"], r.text
            r = await http.post(
                f"{base}/workitems/wi/jobs/{JOB}/tasks",
                headers=auth,
                json={"name": "e", "commandLine": "/bin/true"},
            )
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "JobTaskQuotaReached"
            r = await http.post(
                f"{base}/jobs/wi/tasks?{AZ}", headers=auth, json={"id": "f", "commandLine": "x"}
            )
            assert r.status_code == 409, r.text
            assert "JobTaskQuotaReached" in r.text
        assert sorted(core.get_job("wi", JOB).tasks) == ["a", "b", "c", "jm"]
