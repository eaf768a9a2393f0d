"""Job schedules on the Azure routes over real HTTP (an in-process coordinator): the eleven
operations over the seed's workitems with a schedule, every ISO 8601 duration form, auto pools,
the job schedule error codes, bad input refused with nothing left behind, and the job-scoped
Bearer token a job manager gets."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.azure.wire import AV, IMAGE, azure_err, pool_body
from tests.harness import cluster_ctx
from tests.integration.test_rest_bad_input import Raw, raw_cluster


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path) as (_, raw):
        yield raw


def schedule_body(sid: str, on_all: str = "terminatejob", **extra: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "displayName": "nightly",
        "schedule": {"recurrenceInterval": "PT05M00S", "startWindow": "PT1H30M"},
        "jobSpecification": {
            "priority": 7,
            "displayName": "a nightly job",
            "constraints": {"maxWallClockTime": "P1D", "maxTaskRetryCount": 2},
            "poolInfo": {"poolId": "sp"},
            "onAllTasksComplete": on_all,
            "maxParallelTasks": 3,
            "commonEnvironmentSettings": [{"name": "K", "value": "v"}],
            "metadata": [{"name": "job", "value": "meta"}],
        },
        "metadata": [{"name": "owner", "value": "me"}],
        **extra,
    }


async def _jobs(api: Raw, sid: str) -> list[dict[str, Any]]:
    for _ in range(200):
        r = await api("GET", f"/jobschedules/{sid}/jobs", query=AV)
        assert r.status_code == 200, r.text
        if r.json()["value"]:
            return r.json()["value"]
        await trio.sleep(0.05)
    raise AssertionError("the schedule made no job")


async def test_job_schedule_operations(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
    # noaction: a job without tasks that says terminatejob ends at the coordinator's next tick
    # (Azure: no tasks means all are complete), which would race the terminate checked below.
    r = await api("POST", "/jobschedules", schedule_body("js", on_all="noaction"), query=AV)
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith("/jobschedules/js")
    assert r.headers["etag"]
    r = await api("POST", "/jobschedules", schedule_body("JS"), query=AV)
    azure_err(r, 409, "JobScheduleExists")
    assert (await api("HEAD", "/jobschedules/js", query=AV)).status_code == 200
    assert (await api("HEAD", "/jobschedules/nope", query=AV)).status_code == 404
    azure_err(await api("GET", "/jobschedules/nope", query=AV), 404, "JobScheduleNotFound")

    jobs = await _jobs(api, "js")
    assert [j["id"] for j in jobs] == ["js:job-1"]
    assert jobs[0]["priority"] == 7
    assert jobs[0]["displayName"] == "a nightly job"
    assert jobs[0]["metadata"] == [{"name": "job", "value": "meta"}]
    assert jobs[0]["onAllTasksComplete"] == "noaction"
    assert jobs[0]["maxParallelTasks"] == 3
    s = (await api("GET", "/jobschedules/js", query=AV)).json()
    assert s["state"] == "active"
    assert s["displayName"] == "nightly"
    assert s["schedule"] == {"recurrenceInterval": "PT5M", "startWindow": "PT1H30M"}
    spec = s["jobSpecification"]
    assert spec["poolInfo"] == {"poolId": "sp"}
    assert spec["maxParallelTasks"] == 3
    assert spec["constraints"] == {"maxWallClockTime": "P1D", "maxTaskRetryCount": 2}
    assert spec["commonEnvironmentSettings"] == [{"name": "K", "value": "v"}]
    assert s["metadata"] == [{"name": "owner", "value": "me"}]
    info = s["executionInfo"]
    assert info["recentJob"]["id"] == "js:job-1"
    assert info["recentJob"]["url"].endswith("/jobs/js:job-1")
    assert info["nextRunTime"]  # the next occurrence, five minutes on
    assert "stats" not in s
    stats = (await api("GET", "/jobschedules/js", query=AV + "&$expand=stats")).json()["stats"]
    assert stats["numSucceededTasks"] == "0"
    # The seed sees the same thing as a workitem with a schedule.
    wi = (await api("GET", "/workitems/js")).json()
    assert wi["schedule"]["recurrenceInterval"] == "PT5M"
    # Lists, $filter and $select.
    listed = (await api("GET", "/jobschedules", query=AV)).json()["value"]
    assert [x["id"] for x in listed] == ["js"]
    q = AV + "&$filter=state%20eq%20%27active%27&$select=id,state"
    assert (await api("GET", "/jobschedules", query=q)).json()["value"] == [
        {"id": "js", "state": "active"}
    ]

    # PATCH changes what is present, for jobs created later; the job already made keeps its own.
    etag = s["eTag"]
    patch = {"jobSpecification": {"priority": 100, "poolInfo": {"poolId": "sp"}}}
    r = await api("PATCH", "/jobschedules/js", patch, query=AV)
    assert r.status_code == 200, r.text
    s = (await api("GET", "/jobschedules/js", query=AV)).json()
    assert s["eTag"] != etag
    assert s["jobSpecification"]["priority"] == 100
    assert s["schedule"]["recurrenceInterval"] == "PT5M"  # not in the PATCH: kept
    assert s["metadata"] == [{"name": "owner", "value": "me"}]
    assert (await api("GET", "/jobs/js:job-1", query=AV)).json()["priority"] == 7
    r = await api(
        "PATCH", "/jobschedules/js", {"schedule": {}}, query=AV, headers={"If-Match": etag}
    )
    azure_err(r, 412, "ConditionNotMet")
    # PUT replaces: schedule and jobSpecification required, absent metadata removed.
    r = await api("PUT", "/jobschedules/js", {"schedule": {"recurrenceInterval": "P1D"}}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "jobSpecification")
    put = {
        "schedule": {"recurrenceInterval": "P1D"},
        "jobSpecification": {"poolInfo": {"poolId": "sp"}},
    }
    assert (await api("PUT", "/jobschedules/js", put, query=AV)).status_code == 200
    s = (await api("GET", "/jobschedules/js", query=AV)).json()
    assert s["schedule"] == {"recurrenceInterval": "P1D"}
    assert s["metadata"] == []
    assert s["jobSpecification"]["priority"] == 0

    # disable / enable answer 204; terminate ends the schedule and its job.
    r = await api("POST", "/jobschedules/js/disable", query=AV)
    assert r.status_code == 204, r.text
    assert (await api("GET", "/jobschedules/js", query=AV)).json()["state"] == "disabled"
    assert (await api("POST", "/jobschedules/js/enable", query=AV)).status_code == 204
    assert (await api("GET", "/jobschedules/js", query=AV)).json()["state"] == "active"
    assert (await api("POST", "/jobschedules/js/terminate", query=AV)).status_code == 202
    for _ in range(200):
        s = (await api("GET", "/jobschedules/js", query=AV)).json()
        if s["state"] == "completed":
            break
        await trio.sleep(0.05)
    assert s["state"] == "completed"
    assert s["executionInfo"]["endTime"]
    job = (await api("GET", "/jobs/js:job-1", query=AV)).json()
    assert job["state"] == "completed"
    assert job["executionInfo"]["terminateReason"] == "TerminateJobSchedule"
    r = await api("PATCH", "/jobschedules/js", {"metadata": []}, query=AV)
    azure_err(r, 409, "JobScheduleCompleted")
    azure_err(await api("POST", "/jobschedules/js/disable", query=AV), 409, "JobScheduleCompleted")
    # DELETE removes it with its jobs.
    assert (await api("DELETE", "/jobschedules/js", query=AV)).status_code == 202
    azure_err(await api("GET", "/jobschedules/js", query=AV), 404, "JobScheduleNotFound")
    azure_err(await api("GET", "/jobs/js:job-1", query=AV), 404, "JobNotFound")
    assert (await api("GET", "/jobschedules", query=AV)).json()["value"] == []


async def test_schedule_times_and_durations(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
    body = schedule_body("later")
    body["schedule"] = {
        "doNotRunUntil": "2099-01-01T00:00:00.0000000Z",
        "doNotRunAfter": "2099-02-01T00:00:00Z",
        "startWindow": "P0DT0H10M0S",
        "recurrenceInterval": "P2W",
    }
    assert (await api("POST", "/jobschedules", body, query=AV)).status_code == 201
    s = (await api("GET", "/jobschedules/later", query=AV)).json()
    assert s["schedule"] == {
        "doNotRunUntil": "2099-01-01T00:00:00.000000Z",
        "doNotRunAfter": "2099-02-01T00:00:00.000000Z",
        "startWindow": "PT10M",
        "recurrenceInterval": "P14D",
    }
    assert s["executionInfo"]["nextRunTime"] == "2099-01-01T00:00:00.000000Z"
    assert "recentJob" not in s["executionInfo"]
    assert (await api("GET", "/jobschedules/later/jobs", query=AV)).json()["value"] == []
    # A job id and a schedule id share one namespace here.
    r = await api("POST", "/jobs", {"id": "plain", "poolInfo": {"poolId": "sp"}}, query=AV)
    assert r.status_code == 201
    azure_err(
        await api("POST", "/jobschedules", schedule_body("plain"), query=AV),
        409,
        "JobScheduleExists",
    )
    azure_err(await api("GET", "/jobschedules/plain", query=AV), 404, "JobScheduleNotFound")


@pytest.mark.parametrize(
    ("change", "prop"),
    [
        ({"schedule": {"recurrenceInterval": "every hour"}}, "schedule.recurrenceInterval"),
        ({"schedule": {"recurrenceInterval": "PT30S"}}, "schedule.recurrenceInterval"),
        ({"schedule": {"doNotRunUntil": "tomorrow"}}, "schedule.doNotRunUntil"),
        ({"schedule": None}, "schedule"),
        ({"jobSpecification": None}, "jobSpecification"),
        ({"jobSpecification": {"priority": 1}}, "jobSpecification.poolInfo"),
        ({"jobSpecification": {"poolInfo": {"poolId": "sp"}, "priority": 5000}}, "priority"),
        (
            {
                "jobSpecification": {
                    "poolInfo": {"poolId": "sp"},
                    "jobPreparationTask": {
                        "commandLine": "x",
                        "containerSettings": {"imageName": "u"},
                    },
                }
            },
            "jobSpecification.jobPreparationTask.containerSettings",
        ),
        (
            {
                "jobSpecification": {
                    "poolInfo": {"poolId": "sp"},
                    "jobReleaseTask": {"commandLine": "x"},
                }
            },
            "jobReleaseTask",
        ),
        (
            {
                "jobSpecification": {
                    "poolInfo": {
                        "autoPoolSpecification": {"poolLifetimeOption": "forever", "pool": {}}
                    }
                }
            },
            "jobSpecification.poolInfo.autoPoolSpecification.poolLifetimeOption",
        ),
        (
            {"jobSpecification": {"poolInfo": {"poolId": "sp"}, "maxParallelTasks": 0}},
            "jobSpecification.maxParallelTasks",
        ),
    ],
)
async def test_bad_schedules_are_refused_and_leave_nothing(
    api: Raw, change: dict[str, Any], prop: str
) -> None:
    assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
    body = {**schedule_body("bad"), **change}
    r = await api("POST", "/jobschedules", body, query=AV)
    assert r.status_code == 400, r.text
    values = {v["key"]: v["value"] for v in r.json()["values"]}
    assert values.get("PropertyName") == prop, r.json()
    assert (await api("GET", "/jobschedules", query=AV)).json()["value"] == []
    assert (await api("GET", "/workitems")).json()["value"] == []
    # A bad PATCH leaves the schedule as it was.
    assert (await api("POST", "/jobschedules", schedule_body("ok"), query=AV)).status_code == 201
    before = (await api("GET", "/jobschedules/ok", query=AV)).json()
    r = await api("PATCH", "/jobschedules/ok", change, query=AV)
    if change.get("schedule", 0) is None or change.get("jobSpecification", 0) is None:
        assert r.status_code == 200  # null means "not given" in a PATCH
    else:
        assert r.status_code == 400, r.text
        after = (await api("GET", "/jobschedules/ok", query=AV)).json()
        assert after["eTag"] == before["eTag"]


async def test_auto_pool_per_job_schedule(api: Raw) -> None:
    auto = {
        "autoPoolIdPrefix": "nightly",
        "poolLifetimeOption": "jobschedule",
        "keepAlive": False,
        "pool": {
            "vmSize": "Standard_D2s_v3",
            "virtualMachineConfiguration": dict(IMAGE),
            "targetDedicatedNodes": 0,
        },
    }
    body = schedule_body("ap")
    body["jobSpecification"]["poolInfo"] = {"autoPoolSpecification": auto}
    r = await api("POST", "/jobschedules", body, query=AV)
    assert r.status_code == 201, r.text
    jobs = await _jobs(api, "ap")
    pool_id = jobs[0]["executionInfo"]["poolId"]
    assert pool_id.startswith("nightly")
    pools = [p["id"] for p in (await api("GET", "/pools", query=AV)).json()["value"]]
    assert pool_id in pools
    s = (await api("GET", "/jobschedules/ap", query=AV)).json()
    assert s["jobSpecification"]["poolInfo"]["autoPoolSpecification"]["poolLifetimeOption"] == (
        "jobschedule"
    )
    seed = (await api("GET", "/workitems/ap")).json()["jobExecutionEnvironment"]
    assert seed["autoPoolSpecification"]["poolLifetimeOption"] == "workitem"
    # Lifetime jobschedule: the pool goes when the schedule ends.
    assert (await api("POST", "/jobschedules/ap/terminate", query=AV)).status_code == 202
    for _ in range(200):
        pools = [p["id"] for p in (await api("GET", "/pools", query=AV)).json()["value"]]
        if pool_id not in pools:
            break
        await trio.sleep(0.05)
    assert pool_id not in pools


async def test_job_token_is_a_bearer_token_for_its_own_job(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
    body = schedule_body("tok")
    body["jobSpecification"]["jobManagerTask"] = {
        "id": "jm",
        "commandLine": "/bin/true",
        "authenticationTokenSettings": {"access": ["job"]},
    }
    assert (await api("POST", "/jobschedules", body, query=AV)).status_code == 201
    await _jobs(api, "tok")
    s = (await api("GET", "/jobschedules/tok", query=AV)).json()
    jm = s["jobSpecification"]["jobManagerTask"]
    assert jm["authenticationTokenSettings"] == {"access": ["job"]}
    bad = dict(body, id="tok2")
    bad["jobSpecification"] = dict(body["jobSpecification"])
    bad["jobSpecification"]["jobManagerTask"] = dict(
        jm, authenticationTokenSettings={"access": ["pool"]}
    )
    r = await api("POST", "/jobschedules", bad, query=AV)
    azure_err(
        r,
        400,
        "InvalidPropertyValue",
        "jobSpecification.jobManagerTask.authenticationTokenSettings.access[0]",
    )


async def test_schedule_errors_need_the_api_version(api: Raw) -> None:
    azure_err(await api("GET", "/jobschedules"), 400, "MissingRequiredQueryParameter")


async def test_bearer_job_token_reaches_its_own_job_only(nursery, tmp_path) -> None:
    async with cluster_ctx(nursery, tmp_path) as c:
        api = Raw(c.rc.endpoint, c.rc.account, c.rc.key)
        try:
            assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
            for sid in ("mine", "theirs"):
                body = schedule_body(sid)
                body["schedule"] = {}
                r = await api("POST", "/jobschedules", body, query=AV)
                assert r.status_code == 201, r.text
            await _jobs(api, "mine")
            await _jobs(api, "theirs")
            # What the job manager of mine:job-1 finds in AZ_BATCH_AUTHENTICATION_TOKEN.
            token = c.rc.service.core.get_job("mine", "job-0000000001").rec.token
            bearer = {"Authorization": f"Bearer {token}"}
            own = await api("GET", "/jobs/mine:job-1", query=AV, headers=bearer, sign=False)
            assert own.status_code == 200, own.text
            task = {"id": "t", "commandLine": "/bin/true"}
            r = await api(
                "POST", "/jobs/mine:job-1/tasks", task, query=AV, headers=bearer, sign=False
            )
            assert r.status_code == 201, r.text
            for path in ("/jobs/theirs:job-1", "/jobs/mine:job-10", "/jobschedules/mine", "/pools"):
                r = await api("GET", path, query=AV, headers=bearer, sign=False)
                azure_err(r, 403, "AuthorizationFailure")
            r = await api(
                "GET",
                "/jobs/mine:job-1",
                query=AV,
                headers={"Authorization": "Bearer x.y.z"},
                sign=False,
            )
            azure_err(r, 401, "AuthenticationFailed")
        finally:
            await api.http.aclose()


async def test_the_older_api_version_serves_job_schedules_too(api: Raw) -> None:
    old = "api-version=2024-02-01.19.0"
    assert (await api("POST", "/pools", pool_body("sp"), query=old)).status_code == 201
    body = schedule_body("v19")
    body["schedule"] = {"recurrenceInterval": "PT1H"}
    assert (await api("POST", "/jobschedules", body, query=old)).status_code == 201
    s = (await api("GET", "/jobschedules/v19", query=old)).json()
    assert s["schedule"] == {"recurrenceInterval": "PT1H"}
    assert [j["id"] for j in await _jobs(api, "v19")] == ["v19:job-1"]
    assert (await api("DELETE", "/jobschedules/v19", query=old)).status_code == 202
