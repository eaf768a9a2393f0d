"""The Azure routes over real HTTP (signed raw requests to an in-process coordinator): api-version
routing beside the seed's routes, Azure's error bodies, request ids, create headers, ETags and
conditional requests, lenient bodies, and clear refusals that leave nothing behind."""

from __future__ import annotations

import copy
from email.utils import parsedate_to_datetime

import pytest
import trio

from tests.azure.wire import AV, azure_err, pool_body
from tests.integration.test_rest_bad_input import Raw, raw_cluster


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path) as (_, raw):
        yield raw


async def test_api_version_chooses_the_api_and_the_seed_stays_as_it_was(api: Raw) -> None:
    # Without an api-version (or with an unknown one) /pools is the seed's, strict as before.
    r = await api("POST", "/pools", {"name": "seedp", "vmSize": "small", "targetDedicated": 0})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "seedp"
    r = await api("GET", "/pools", query="api-version=2015-01-01")
    assert [p["name"] for p in r.json()["value"]] == ["seedp"]
    r = await api("POST", "/pools", pool_body("x"))
    assert r.status_code == 400
    assert r.json()["code"] == "InvalidRequestBody"
    r = await api("POST", "/pools", {"name": "y", "azure": {"vmSize": "a"}})
    assert r.status_code == 400
    assert {v["key"]: v["value"] for v in r.json()["values"]}["field"] == "azure"
    # With an Azure api-version the same path answers in Azure's shape.
    r = await api("GET", "/pools", query=AV)
    assert r.status_code == 200
    body = r.json()
    assert body["odata.metadata"].endswith("/$metadata#pools")
    assert [p["id"] for p in body["value"]] == ["seedp"]
    assert body["value"][0]["vmSize"] == "standard_a1"  # a local size echoed as its Azure twin
    assert r.headers["dataserviceversion"] == "3.0"
    assert r.headers["request-id"]
    # Azure-only paths need a supported api-version.
    azure_err(await api("GET", "/jobs"), 400, "MissingRequiredQueryParameter")
    azure_err(
        await api("GET", "/jobs", query="api-version=2099-01-01"), 400, "InvalidQueryParameterValue"
    )
    azure_err(await api("GET", "/pools/nope", query=AV), 404, "PoolNotFound")
    r = await api("GET", "/pools/nope", query="api-version=2024-02-01.19.0")
    assert r.json()["code"] == "PoolNotFound"
    # Unsigned requests are refused on the Azure routes too, in Azure's shape.
    azure_err(await api("GET", "/pools", query=AV, sign=False), 401, "AuthenticationFailed")


async def test_create_answers_headers_etags_and_conditions(api: Raw) -> None:
    r = await api(
        "POST",
        "/pools",
        pool_body("p1"),
        query=AV,
        headers={
            "client-request-id": "9d0a3a4b-1111-2222-3333-444455556666",
            "return-client-request-id": "true",
        },
    )
    assert r.status_code == 201, r.text
    assert r.content == b""
    assert r.headers["location"].endswith("/pools/p1")
    assert r.headers["dataserviceid"] == r.headers["location"]
    assert r.headers["client-request-id"] == "9d0a3a4b-1111-2222-3333-444455556666"
    etag = r.headers["etag"]
    assert etag.startswith("0x")
    parsedate_to_datetime(r.headers["last-modified"])  # RFC 1123
    r = await api("GET", "/pools/p1", query=AV)
    assert r.headers["etag"] == r.json()["eTag"] == etag
    assert "client-request-id" not in r.headers  # echoed only when asked
    pool = r.json()
    assert pool["vmSize"] == "standard_d2s_v3"
    assert pool["virtualMachineConfiguration"]["nodeAgentSKUId"] == "batch.node.ubuntu 24.04"
    assert pool["taskSchedulingPolicy"] == {"nodeFillType": "spread"}
    assert pool["state"] == "active"
    # Read conditions: 304; write conditions: 412, nothing changed.
    r = await api("GET", "/pools/p1", query=AV, headers={"If-None-Match": f'"{etag}"'})
    assert r.status_code == 304
    assert r.content == b""
    r = await api(
        "GET", "/pools/p1", query=AV, headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}
    )
    assert r.status_code == 304
    r = await api("DELETE", "/pools/p1", query=AV, headers={"If-Match": '"0x8D0000000000000"'})
    azure_err(r, 412, "ConditionNotMet")
    r = await api(
        "PATCH",
        "/pools/p1",
        {"metadata": [{"name": "a", "value": "b"}]},
        query=AV,
        headers={"If-Match": etag},
    )
    assert r.status_code == 200, r.text
    assert r.headers["etag"] != etag
    etag2 = r.headers["etag"]
    r = await api("PATCH", "/pools/p1", {"vmSize": "standard_nope_v9", "metadata": []}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "vmSize")
    r = await api("PATCH", "/pools/p1", {"networkConfiguration": {"subnetId": "s"}}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "networkConfiguration")
    r = await api("PATCH", "/pools/p1", {"startTask": {"commandLine": ""}}, query=AV)
    azure_err(r, 400, "MissingRequiredProperty")
    after = (await api("GET", "/pools/p1", query=AV)).json()
    assert after["eTag"] == etag2  # neither refused PATCH changed anything
    assert after["metadata"] == [{"name": "a", "value": "b"}]
    # While the pool has no nodes its size and slots may change too.
    r = await api(
        "PATCH", "/pools/p1", {"vmSize": "Standard_D4s_v3", "taskSlotsPerNode": "4"}, query=AV
    )
    assert r.status_code == 200, r.text
    after = (await api("GET", "/pools/p1", query=AV)).json()
    assert (after["vmSize"], after["taskSlotsPerNode"]) == ("standard_d4s_v3", 4)
    r = await api("HEAD", "/pools/p1", query=AV)
    assert r.status_code == 200
    r = await api("HEAD", "/pools/nope", query=AV)
    assert r.status_code == 404
    assert r.headers["x-ms-error-code"] == "PoolNotFound"
    r = await api("POST", "/pools", pool_body("P1"), query=AV)
    azure_err(r, 409, "PoolExists")
    r = await api(
        "POST",
        "/pools/p1/updateproperties",
        {"metadata": [], "applicationPackageReferences": [], "startTask": {"commandLine": "true"}},
        query=AV,
    )
    assert r.status_code == 204, r.text
    got = (await api("GET", "/pools/p1", query=AV)).json()
    assert got["metadata"] == []
    assert got["startTask"]["commandLine"] == "true"
    assert (await api("DELETE", "/pools/p1", query=AV)).status_code == 202


async def test_lenient_bodies_and_numeric_strings(api: Raw) -> None:
    body = pool_body("p2", taskSlotsPerNode="2", targetDedicatedNodes="0", someFutureField={"x": 1})
    body["virtualMachineConfiguration"]["unknownThing"] = True
    r = await api("POST", "/pools", body, query=AV)
    assert r.status_code == 201, r.text
    pool = (await api("GET", "/pools/p2", query=AV)).json()
    assert pool["taskSlotsPerNode"] == 2
    assert "someFutureField" not in pool
    r = await api(
        "POST",
        "/pools/p2/resize",
        {"targetDedicatedNodes": "1", "targetLowPriorityNodes": "3"},
        query=AV,
    )
    assert r.status_code == 202, r.text
    pool = (await api("GET", "/pools/p2", query=AV)).json()
    assert pool["targetDedicatedNodes"] == 1
    assert pool["targetLowPriorityNodes"] == 3
    assert any("low-priority" in e["message"] for e in pool["resizeErrors"])
    r = await api("PATCH", "/pools/p2", {"taskSlotsPerNode": 2}, query=AV)
    azure_err(r, 409, "PoolHasNodes")
    r = await api("POST", "/pools/p2/resize", {"targetDedicatedNodes": "two"}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "targetDedicatedNodes")


async def test_numbers_past_int32_are_refused_and_leave_the_job_working(api: Raw) -> None:
    """Every integer of an Azure request is an Int32. A larger one (1e300 is a whole number in
    JSON) was once stored in the job, whose every later change then failed with a 500: now it is a
    400 naming the property, and nothing changed."""
    assert (await api("POST", "/pools", pool_body("p"), query=AV)).status_code == 201
    job = {"id": "j", "poolInfo": {"poolId": "p"}, "maxParallelTasks": 2}
    assert (await api("POST", "/jobs", job, query=AV)).status_code == 201
    for field, value in (
        ("maxParallelTasks", 1.5e308),
        ("maxParallelTasks", 2**31),
        ("priority", "99999999999999999999999"),
        ("priority", -(2**31) - 1),
    ):
        r = await api("PATCH", "/jobs/j", {field: value}, query=AV)
        body = azure_err(r, 400, "InvalidPropertyValue", field)
        assert "32-bit" not in body["message"]["value"]  # says the range instead
        assert "2147483647" in body["message"]["value"], body
    r = await api("POST", "/pools/p/resize", {"targetDedicatedNodes": 2**40}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "targetDedicatedNodes")
    r = await api("POST", "/jobs", {**job, "id": "k", "priority": 2**31}, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "priority")
    assert (await api("GET", "/jobs/k", query=AV)).status_code == 404
    got = (await api("GET", "/jobs/j", query=AV)).json()
    assert got["maxParallelTasks"] == 2
    assert got["priority"] == 0
    r = await api("PATCH", "/jobs/j", {"maxParallelTasks": 2**31 - 1}, query=AV)
    assert r.status_code == 200, r.text
    r = await api("POST", "/jobs/j/terminate", {"terminateReason": "done"}, query=AV)
    assert r.status_code == 202, r.text


async def test_what_is_kept_as_sent_must_be_storable(api: Raw) -> None:
    """An image reference and an auto pool's specification are stored and shown as they were sent,
    unknown properties included: a number there past 64 bits is a 400 naming its place (it was
    once taken and failed the commit with a 500), a long one within them is kept."""
    body = copy.deepcopy(pool_body("p"))  # its image reference is shared with other tests
    body["virtualMachineConfiguration"]["imageReference"]["build"] = 10**30
    r = await api("POST", "/pools", body, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "virtualMachineConfiguration.imageReference.build")
    assert (await api("GET", "/pools/p", query=AV)).status_code == 404
    auto = {
        "poolLifetimeOption": "job",
        "pool": {**copy.deepcopy(pool_body("x")), "futureSetting": {"n": [1, -(2**70)]}},
    }
    del auto["pool"]["id"]
    r = await api(
        "POST", "/jobs", {"id": "j", "poolInfo": {"autoPoolSpecification": auto}}, query=AV
    )
    azure_err(
        r, 400, "InvalidPropertyValue", "poolInfo.autoPoolSpecification.pool.futureSetting.n[1]"
    )
    assert (await api("GET", "/jobs/j", query=AV)).status_code == 404
    body["virtualMachineConfiguration"]["imageReference"]["build"] = 2**63 - 1
    assert (await api("POST", "/pools", body, query=AV)).status_code == 201
    shown = (await api("GET", "/pools/p", query=AV)).json()
    assert shown["virtualMachineConfiguration"]["imageReference"]["build"] == 2**63 - 1


REFUSED = [
    ({"cloudServiceConfiguration": {"osFamily": "6"}}, "cloudServiceConfiguration"),
    ({"networkConfiguration": {"subnetId": "/s/1"}}, "networkConfiguration"),
    ({"mountConfiguration": [{"nfsMountConfiguration": {}}]}, "mountConfiguration"),
    ({"userAccounts": [{"name": "u", "password": "p"}]}, "userAccounts"),
    (
        {"vmc": {"windowsConfiguration": {"enableAutomaticUpdates": False}}},
        "virtualMachineConfiguration.windowsConfiguration",
    ),
    (
        {"vmc": {"diskEncryptionConfiguration": {"targets": ["osdisk"]}}},
        "virtualMachineConfiguration.diskEncryptionConfiguration",
    ),
    ({"vmc": {"extensions": [{"name": "e"}]}}, "virtualMachineConfiguration.extensions"),
    (
        {"vmc": {"nodeAgentSKUId": "batch.node.windows amd64"}},
        "virtualMachineConfiguration.nodeAgentSKUId",
    ),
    ({"vmSize": "Standard_Nonexistent_v9"}, "vmSize"),
    ({"taskSlotsPerNode": 99}, "taskSlotsPerNode"),
    ({"targetDedicatedNodes": [1]}, "targetDedicatedNodes"),
    (
        {"startTask": {"commandLine": "x", "containerSettings": {"imageName": "i"}}},
        "startTask.containerSettings",
    ),
    (
        {
            "startTask": {
                "commandLine": "x",
                "resourceFiles": [{"storageContainerUrl": "https://s/c"}],
            }
        },
        "startTask.resourceFiles[0].storageContainerUrl",
    ),
]


async def test_unsupported_settings_are_refused_naming_the_property(api: Raw) -> None:
    for change, prop in REFUSED:
        body = pool_body("refused")
        vmc = change.pop("vmc", None)
        if vmc:
            body["virtualMachineConfiguration"] = {**body["virtualMachineConfiguration"], **vmc}
        body.update(change)
        r = await api("POST", "/pools", body, query=AV)
        azure_err(r, 400, r.json().get("code", "?"), prop)
        assert r.json()["code"] in ("InvalidPropertyValue", "MissingRequiredProperty"), r.text
    azure_err(await api("POST", "/pools", query=AV), 400, "MissingRequiredProperty")
    r = await api("POST", "/pools", content=b"{not json", query=AV)
    azure_err(r, 400, "InvalidRequestBody")
    r = await api("POST", "/pools", content=b'{"id": "p\\ud800", "vmSize": "a"}', query=AV)
    azure_err(r, 400, "InvalidRequestBody")
    assert "lone UTF-16 surrogate escape (\\ud800)" in r.json()["message"]["value"], r.text
    # Nothing was stored by any of them.
    assert (await api("GET", "/pools", query=AV)).json()["value"] == []


async def test_jobs_tasks_and_their_refusals(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("p3"), query=AV)).status_code == 201
    azure_err(
        await api("POST", "/jobs", {"id": "j"}, query=AV), 400, "InvalidPropertyValue", "poolInfo"
    )
    r = await api(
        "POST",
        "/jobs",
        {"id": "j", "poolInfo": {"poolId": "p3"}, "onTaskFailure": "sometimes"},
        query=AV,
    )
    azure_err(r, 400, "InvalidPropertyValue", "onTaskFailure")
    for bad in (0, -2, "many"):
        r = await api(
            "POST",
            "/jobs",
            {"id": "j", "poolInfo": {"poolId": "p3"}, "maxParallelTasks": bad},
            query=AV,
        )
        azure_err(r, 400, "InvalidPropertyValue", "maxParallelTasks")
    azure_err(await api("GET", "/jobs/j", query=AV), 404, "JobNotFound")
    r = await api(
        "POST",
        "/jobs",
        {"id": "j", "poolInfo": {"poolId": "p3"}, "priority": "5", "x-unknown": 1},
        query=AV,
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith("/jobs/j")
    job = (await api("GET", "/jobs/j", query=AV)).json()
    assert (job["id"], job["priority"], job["state"], job["poolInfo"]) == (
        "j",
        5,
        "active",
        {"poolId": "p3"},
    )
    # The seed sees the same job as a workitem with its one job (one state model).
    r = await api("GET", "/workitems/j/jobs")
    assert [x["name"] for x in r.json()["value"]] == ["job-0000000001"]
    r = await api("PATCH", "/jobs/j", {"priority": 7}, query=AV)
    assert r.status_code == 200
    assert (await api("GET", "/jobs/j", query=AV)).json()["priority"] == 7
    # A collection: each task gets its own result; a refused one stores nothing.
    tasks = [
        {"id": "ok1", "commandLine": "true"},
        {"id": "bad", "commandLine": "true", "outputFiles": [{"filePattern": "*"}]},
        {"id": "nocmd"},
        {"id": "ok2", "commandLine": "true", "constraints": {"maxTaskRetryCount": "2"}},
    ]
    r = await api("POST", "/jobs/j/addtaskcollection", {"value": tasks}, query=AV)
    assert r.status_code == 200, r.text
    res = {x["taskId"]: x for x in r.json()["value"]}
    assert res["ok1"]["status"] == "success"
    assert res["ok1"]["location"].endswith("/jobs/j/tasks/ok1")
    assert res["ok1"]["eTag"]
    assert res["bad"]["status"] == "clienterror"
    assert res["bad"]["error"]["code"] == "InvalidPropertyValue"
    assert res["nocmd"]["error"]["code"] == "MissingRequiredProperty"
    listed = (await api("GET", "/jobs/j/tasks", query=AV)).json()["value"]
    assert sorted(t["id"] for t in listed) == ["ok1", "ok2"]
    ok2 = (await api("GET", "/jobs/j/tasks/ok2", query=AV)).json()
    assert ok2["constraints"]["maxTaskRetryCount"] == 2
    assert ok2["state"] == "active"
    r = await api(
        "POST",
        "/jobs/j/addtaskcollection",
        {"value": [{"id": f"t{i}", "commandLine": "true"} for i in range(101)]},
        query=AV,
    )
    azure_err(r, 413, "RequestBodyTooLarge")
    r = await api(
        "POST",
        "/jobs/j/tasks",
        {"id": "dep", "commandLine": "true", "dependsOn": {"taskIds": ["ok1"]}},
        query=AV,
    )
    azure_err(r, 400, "TaskDependenciesNotSpecifiedOnJob", "dependsOn")
    azure_err(
        await api("POST", "/jobs/j/tasks", {"id": "ok1", "commandLine": "true"}, query=AV),
        409,
        "TaskExists",
    )
    azure_err(await api("GET", "/jobs/nope/tasks", query=AV), 404, "JobNotFound")
    r = await api(
        "GET",
        "/jobs/j/tasks",
        query=AV + "&%24filter=state%20eq%20%27active%27%20and%20id%20eq%20%27ok2%27",
    )
    assert [t["id"] for t in r.json()["value"]] == ["ok2"]
    r = await api("GET", "/jobs/j/tasks", query=AV + "&%24filter=endswith(id%2C%27x%27)")
    azure_err(r, 400, "InvalidQueryParameterValue")
    r = await api("GET", "/jobs/j/tasks", query=AV + "&timeOut=abc")
    azure_err(r, 400, "InvalidQueryParameterValue")
    counts = (await api("GET", "/jobs/j/taskcounts", query=AV)).json()
    assert counts["taskCounts"]["active"] == 2
    assert counts["taskSlotCounts"]["active"] == 2
    assert (await api("POST", "/jobs/j/tasks/ok1/terminate", query=AV)).status_code == 204
    assert (await api("GET", "/jobs/j/tasks/ok1/subtasksinfo", query=AV)).json()["value"] == []
    assert (await api("DELETE", "/jobs/j/tasks/ok1", query=AV)).status_code == 200
    assert (
        await api("POST", "/jobs/j/terminate", {"terminateReason": "done"}, query=AV)
    ).status_code == 202
    assert (await api("DELETE", "/jobs/j", query=AV)).status_code == 202
    azure_err(await api("GET", "/jobs/j", query=AV), 404, "JobNotFound")
    # Pages: maxresults and an absolute nextLink carrying the api-version and a skip token.
    for i in range(3):
        await api("POST", "/jobs", {"id": f"pg{i}", "poolInfo": {"poolId": "p3"}}, query=AV)
    page = (await api("GET", "/jobs", query=AV + "&maxresults=2")).json()
    assert len(page["value"]) == 2
    link = page["odata.nextLink"]
    assert link.startswith("http://")
    assert "api-version=2025-06-01" in link
    assert "skiptoken" in link


async def test_autoscale_actions(api: Raw) -> None:
    body = pool_body("as", enableAutoScale=True, autoScaleFormula="$TargetDedicatedNodes=0;")
    r = await api("POST", "/pools", body, query=AV)
    azure_err(r, 400, "InvalidPropertyValue", "targetDedicatedNodes")  # both given: refused
    del body["targetDedicatedNodes"]
    body["autoScaleEvaluationInterval"] = "PT5M"
    assert (await api("POST", "/pools", body, query=AV)).status_code == 201
    good = {"autoScaleFormula": "$TargetDedicatedNodes=1;"}
    r = await api("POST", "/pools/as/evaluateautoscale", good, query=AV)
    assert r.status_code == 200, r.text
    assert "$TargetDedicatedNodes=1" in r.json()["results"]
    bad = {"autoScaleFormula": "$TargetDedicatedNodes=("}
    r = await api("POST", "/pools/as/evaluateautoscale", bad, query=AV)
    assert r.status_code == 400, r.text
    assert (await api("POST", "/pools/as/disableautoscale", query=AV)).status_code == 200
    assert (await api("GET", "/pools/as", query=AV)).json()["enableAutoScale"] is False
    # Enabling again within 30 s of the last enable is throttled, as the service does.
    r = await api("POST", "/pools/as/enableautoscale", good, query=AV)
    azure_err(r, 409, "TooManyEnableAutoScaleRequests")
    assert (await api("GET", "/pools/as", query=AV)).json()["enableAutoScale"] is False


async def test_a_schedules_jobs_are_s_job_n(api: Raw) -> None:
    assert (await api("POST", "/pools", pool_body("sp"), query=AV)).status_code == 201
    wi = {
        "name": "sch",
        "jobExecutionEnvironment": {"poolName": "sp"},
        "schedule": {"recurrenceInterval": "PT1H"},
    }
    assert (await api("POST", "/workitems", wi)).status_code == 201
    ids: list[str] = []
    for _ in range(200):
        ids = [j["id"] for j in (await api("GET", "/jobs", query=AV)).json()["value"]]
        if ids:
            break
        await trio.sleep(0.05)
    assert ids == ["sch:job-1"]
    job = (await api("GET", "/jobs/sch:job-1", query=AV)).json()
    assert job["url"].endswith("/jobs/sch:job-1")
    r = await api("POST", "/jobs/sch:job-1/tasks", {"id": "t", "commandLine": "true"}, query=AV)
    assert r.status_code == 201, r.text
    seed = (await api("GET", "/workitems/sch/jobs/job-0000000001/tasks")).json()["value"]
    assert [t["name"] for t in seed] == ["t"]
    azure_err(await api("GET", "/jobs/sch", query=AV), 404, "JobNotFound")
    azure_err(await api("GET", "/jobs/sch:job-2", query=AV), 404, "JobNotFound")
