"""Issue 3, bad input over real HTTP: every refused request gets a clear code and message, the right
status, the offending field in `values`, and leaves nothing stored (checked with a GET afterwards).

Raw requests (httpx2) against a real coordinator, signed with coordinator.common.sharedkey.sign_request
or deliberately not."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx2
import pytest
import trio

from coordinator.common.sharedkey import sign_request
from tests.harness import Cluster, cluster_ctx

JOB = "job-0000000001"


class Raw:
    def __init__(self, endpoint: str, account: str, key: str) -> None:
        self.endpoint = endpoint
        self.account = account
        self.key = key
        self.http = httpx2.AsyncClient(timeout=30)
        self.keys: list[str] = []

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: str = "",
        sign: bool = True,
        key: str | None = None,
        account: str | None = None,
        date: str | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx2.Response:
        h = dict(headers or {})
        if content is None and body is not None:
            content = json.dumps(body).encode()
        if content is not None:
            h["Content-Type"] = "application/json"
            h["Content-Length"] = str(len(content))
        elif method in ("POST", "PUT", "PATCH"):
            h["Content-Length"] = "0"
        if date is not None:
            h["ocp-date"] = date
        if sign:
            sign_request(method, path, query, h, account or self.account, key or self.key)
        url = self.endpoint + path + (f"?{query}" if query else "")
        return await self.http.request(method, url, headers=h, content=content)

    async def names(self, path: str) -> list[str]:
        r = await self("GET", path)
        assert r.status_code == 200, r.text
        return [x["name"] for x in r.json()["value"]]


def err(r: httpx2.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == code, body
    assert body["message"]["value"], body  # a human-readable message
    assert body["message"]["lang"] == "en-us"
    values = {v["key"]: v["value"] for v in body.get("values", [])}
    if field is not None:
        assert values.get("field") == field, body
    return body


@contextlib.asynccontextmanager
async def raw_cluster(
    nursery: trio.Nursery, tmp_path: Any, **kw: Any
) -> AsyncIterator[tuple[Cluster, Raw]]:
    """A coordinator (`cluster_ctx(**kw)`) and a `Raw` client on it, closed after use."""
    async with cluster_ctx(nursery, tmp_path, **kw) as c:
        raw = Raw(c.rc.endpoint, c.rc.account, c.rc.key)
        raw.keys = list(c.rc.service.keys)
        try:
            yield c, raw
        finally:
            await raw.http.aclose()


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path) as (_, raw):
        yield raw


POOL = {"name": "p", "vmSize": "small", "targetDedicated": 0}
WI = {"name": "wi", "jobExecutionEnvironment": {"poolName": "p"}}


async def _pool_and_workitem(api: Raw) -> None:
    assert (await api("POST", "/pools", POOL)).status_code == 201
    assert (await api("POST", "/workitems", WI)).status_code == 201


# ---------------------------------------------------------------------------- names


BAD_NAMES = [
    ("", "MissingRequiredProperty"),
    ("x" * 65, "InvalidPropertyValue"),
    ("a b", "InvalidPropertyValue"),
    ("a.b", "InvalidPropertyValue"),
    ("ü", "InvalidPropertyValue"),
    ("a\n", "InvalidPropertyValue"),
    ("a/b", "InvalidPropertyValue"),
]


async def test_bad_names_are_refused_and_nothing_is_stored(api):
    await _pool_and_workitem(api)
    for name, code in BAD_NAMES:
        err(await api("POST", "/pools", {**POOL, "name": name}), 400, code, "name")
        err(await api("POST", "/workitems", {**WI, "name": name}), 400, code, "name")
        err(
            await api(
                "POST", f"/workitems/wi/jobs/{JOB}/tasks", {"name": name, "commandLine": "true"}
            ),
            400,
            code,
            "name",
        )
    err(
        await api(
            "POST",
            "/workitems",
            {"name": "w2", "jobExecutionEnvironment": {"poolName": "bad pool"}},
        ),
        400,
        "InvalidPropertyValue",
        "jobExecutionEnvironment.poolName",
    )
    assert await api.names("/pools") == ["p"]
    assert await api.names("/workitems") == ["wi"]
    assert await api.names(f"/workitems/wi/jobs/{JOB}/tasks") == []
    body = err(await api("POST", "/pools", {**POOL, "name": "x" * 65}), 400, "InvalidPropertyValue")
    assert "64" in body["message"]["value"]


async def test_bad_names_in_a_collection_get_per_task_errors(api):
    await _pool_and_workitem(api)
    tasks = [{"name": n, "commandLine": "true"} for n, _ in BAD_NAMES] + [
        {"name": "good", "commandLine": "true"}
    ]
    r = await api("POST", f"/workitems/wi/jobs/{JOB}/addtaskcollection", {"value": tasks})
    assert r.status_code == 200, r.text
    results = r.json()["value"]
    assert [x["status"] for x in results] == ["clienterror"] * len(BAD_NAMES) + ["success"]
    assert [x["error"]["code"] for x in results[:-1]] == [c for _, c in BAD_NAMES]
    assert await api.names(f"/workitems/wi/jobs/{JOB}/tasks") == ["good"]


# ---------------------------------------------------------------------------- duplicates


async def test_duplicates_are_409_with_a_code_per_resource(api):
    await _pool_and_workitem(api)
    assert (
        await api("POST", f"/workitems/wi/jobs/{JOB}/tasks", {"name": "t", "commandLine": "a"})
    ).status_code == 201
    err(await api("POST", "/pools", {**POOL, "targetDedicated": 3}), 409, "PoolExists")
    err(await api("POST", "/pools", {**POOL, "name": "P"}), 409, "PoolExists")  # case-insensitive
    err(await api("POST", "/workitems", {**WI, "priority": 5}), 409, "WorkItemExists")
    err(
        await api("POST", f"/workitems/wi/jobs/{JOB}/tasks", {"name": "t", "commandLine": "b"}),
        409,
        "TaskExists",
    )
    assert await api.names("/pools") == ["p"]
    assert (await api("GET", "/pools/p")).json()["targetDedicated"] == 0
    assert (await api("GET", "/workitems/wi")).json().get(
        "priority", 0
    ) == 0  # 0 is omitted (omit_defaults)
    assert (await api("GET", f"/workitems/wi/jobs/{JOB}/tasks/t")).json()["commandLine"] == "a"


# ---------------------------------------------------------------------------- unknown resources


async def test_unknown_resources_are_404_with_a_code(api):
    await _pool_and_workitem(api)
    cases = [
        ("GET", "/pools/nope", None, "PoolNotFound"),
        ("DELETE", "/pools/nope", None, "PoolNotFound"),
        ("GET", "/pools/nope/tvms", None, "PoolNotFound"),
        ("GET", "/pools/p/tvms/nope", None, "TVMNotFound"),
        ("GET", "/workitems/nope", None, "WorkItemNotFound"),
        ("DELETE", "/workitems/nope", None, "WorkItemNotFound"),
        ("GET", "/workitems/nope/jobs", None, "WorkItemNotFound"),
        ("GET", f"/workitems/nope/jobs/{JOB}", None, "WorkItemNotFound"),
        ("GET", "/workitems/wi/jobs/job-0000000009", None, "JobNotFound"),
        ("GET", "/workitems/wi/jobs/job-0000000009/tasks", None, "JobNotFound"),
        (
            "POST",
            "/workitems/wi/jobs/job-0000000009/tasks",
            {"name": "t", "commandLine": "x"},
            "JobNotFound",
        ),
        (
            "POST",
            "/workitems/nope/jobs/job-0000000001/tasks",
            {"name": "t", "commandLine": "x"},
            "WorkItemNotFound",
        ),
        (
            "POST",
            "/workitems/wi/jobs/job-0000000009/addtaskcollection",
            {"value": [{"name": "t", "commandLine": "x"}]},
            "JobNotFound",
        ),
        ("GET", f"/workitems/wi/jobs/{JOB}/tasks/nope", None, "TaskNotFound"),
        ("DELETE", f"/workitems/wi/jobs/{JOB}/tasks/nope", None, "TaskNotFound"),
        ("POST", f"/workitems/wi/jobs/{JOB}/tasks/nope/terminate", None, "TaskNotFound"),
        ("GET", f"/workitems/wi/jobs/{JOB}/tasks/nope/files", None, "TaskNotFound"),
    ]
    for method, path, body, code in cases:
        body_ = err(await api(method, path, body), 404, code)
        assert body_["values"], (path, body_)  # names the missing resource
    assert await api.names(f"/workitems/wi/jobs/{JOB}/tasks") == []
    assert await api.names("/workitems/wi/jobs") == [JOB]
    # Percent-encoding is decoded once: "a%2541" names the pool "a%41", not "aA".
    body = err(await api("GET", "/pools/a%2541"), 404, "PoolNotFound")
    assert body["values"] == [{"key": "name", "value": "a%41"}]


async def test_unknown_path_and_method_not_allowed(api):
    err(await api("GET", "/nothing/here"), 404, "ResourceNotFound")
    err(await api("PUT", "/pools", POOL), 405, "MethodNotAllowed")
    err(await api("DELETE", "/pools"), 405, "MethodNotAllowed")
    err(await api("PATCH", "/workitems/wi/jobs/j/tasks"), 405, "MethodNotAllowed")
    assert await api.names("/pools") == []


# ---------------------------------------------------------------------------- malformed bodies


async def test_malformed_json_and_wrong_types_name_the_field(api):
    await _pool_and_workitem(api)
    tasks = f"/workitems/wi/jobs/{JOB}/tasks"
    err(await api("POST", "/pools", content=b"{not json"), 400, "InvalidRequestBody")
    err(await api("POST", "/pools", content=b'{"name": "q"'), 400, "InvalidRequestBody")
    err(await api("POST", "/pools", content=b"\xff\xfe"), 400, "InvalidRequestBody")
    # A lone surrogate escape is named as such (the decoder alone says "truncated").
    body = err(
        await api("POST", "/pools", content=b'{"name": "q\\udbff"}'), 400, "InvalidRequestBody"
    )
    assert "lone UTF-16 surrogate escape (\\udbff)" in body["message"]["value"], body
    body = err(await api("POST", "/pools", content=b'{"name": "q"'), 400, "InvalidRequestBody")
    assert "truncated" in body["message"]["value"], body
    err(await api("POST", "/pools"), 400, "MissingRequestBody")
    err(await api("POST", "/pools", ["q"]), 400, "InvalidRequestBody")
    err(await api("POST", "/pools", {"name": 5}), 400, "InvalidRequestBody", "name")
    err(
        await api("POST", "/pools", {"name": "q", "targetDedicated": "3"}),
        400,
        "InvalidRequestBody",
        "targetDedicated",
    )
    err(
        await api("POST", "/pools", {"name": "q", "targetDedicated": 1.5}),
        400,
        "InvalidRequestBody",
        "targetDedicated",
    )
    err(
        await api("POST", "/pools", {"name": "q", "communication": "yes"}),
        400,
        "InvalidRequestBody",
        "communication",
    )
    err(await api("POST", "/pools", {"vmSize": "small"}), 400, "InvalidRequestBody", "name")
    err(
        await api("POST", "/pools", {"name": "q", "tagetDedicated": 1}),
        400,
        "InvalidRequestBody",
        "tagetDedicated",
    )
    err(
        await api("POST", "/pools", {"name": "q", "startTask": {}}),
        400,
        "InvalidRequestBody",
        "startTask.commandLine",
    )
    err(
        await api("POST", "/pools", {"name": "q", "startTask": {"commandLine": "x", "bogus": 1}}),
        400,
        "InvalidRequestBody",
        "startTask.bogus",
    )
    err(
        await api("POST", "/pools", {"name": "q", "vmSize": "huge"}), 400, "InvalidVmSize", "vmSize"
    )
    err(
        await api("POST", "/pools", {"name": "q", "maxTasksPerVM": 0}),
        400,
        "InvalidPropertyValue",
        "maxTasksPerVM",
    )
    err(
        await api("POST", "/pools", {"name": "q", "tvmFillType": "random"}),
        400,
        "InvalidPropertyValue",
        "tvmFillType",
    )
    err(
        await api("POST", "/pools", {"name": "q", "targetDedicated": -1}),
        400,
        "InvalidPropertyValue",
        "targetDedicated",
    )
    err(
        await api("POST", "/workitems", {"name": "w2"}),
        400,
        "InvalidRequestBody",
        "jobExecutionEnvironment",
    )
    err(
        await api("POST", "/workitems", {**WI, "name": "w2", "priority": "high"}),
        400,
        "InvalidRequestBody",
        "priority",
    )
    err(
        await api("POST", "/workitems", {**WI, "name": "w2", "priority": 1001}),
        400,
        "InvalidPropertyValue",
        "priority",
    )
    err(await api("POST", tasks, {"name": "t"}), 400, "InvalidRequestBody", "commandLine")
    err(
        await api("POST", tasks, {"name": "t", "commandLine": ["a"]}),
        400,
        "InvalidRequestBody",
        "commandLine",
    )
    err(
        await api(
            "POST",
            tasks,
            {"name": "t", "commandLine": "x", "taskConstraints": {"maxWallClockTime": "1h"}},
        ),
        400,
        "InvalidPropertyValue",
        "taskConstraints.maxWallClockTime",
    )
    err(
        await api(
            "POST",
            tasks,
            {"name": "t", "commandLine": "x", "taskConstraints": {"maxTaskRetryCount": "3"}},
        ),
        400,
        "InvalidRequestBody",
        "taskConstraints.maxTaskRetryCount",
    )
    err(
        await api(
            "POST",
            tasks,
            {"name": "t", "commandLine": "x", "environmentSettings": [{"value": "v"}]},
        ),
        400,
        "InvalidRequestBody",
        "environmentSettings[0].name",
    )
    err(
        await api(
            "POST",
            f"/workitems/wi/jobs/{JOB}/addtaskcollection",
            {"value": [{"name": "a", "commandLine": "x"}, {"name": "b", "commandLine": 7}]},
        ),
        400,
        "InvalidRequestBody",
        "value[1].commandLine",
    )
    err(
        await api("POST", f"/workitems/wi/jobs/{JOB}/addtaskcollection", {"tasks": []}),
        400,
        "InvalidRequestBody",
    )
    assert await api.names("/pools") == ["p"]
    assert await api.names("/workitems") == ["wi"]
    assert await api.names(tasks) == []


# ---------------------------------------------------------------------------- environment and limits


async def test_durations_past_the_longest_are_refused_and_the_longest_is_shown(api):
    """A duration longer than the unlimited one (.NET's TimeSpan.MaxValue) is a 400 naming its
    field, and stores nothing; the longest accepted recurrence puts the next run past year 9999,
    which every view shows as the last time there is (it once stored the workitem and then failed
    every listing of workitems with a 500)."""
    await _pool_and_workitem(api)
    huge = "P" + "9" * 300 + "D"
    for interval in ("P99999999D", "P10675200D", huge):
        body = err(
            await api(
                "POST",
                "/workitems",
                {**WI, "name": "s", "schedule": {"recurrenceInterval": interval}},
            ),
            400,
            "InvalidPropertyValue",
            "schedule.recurrenceInterval",
        )
        assert len(body["message"]["value"]) < 300, body  # the value is quoted cut short
    err(
        await api(
            "POST",
            f"/workitems/wi/jobs/{JOB}/tasks",
            {"name": "t", "commandLine": "true", "taskConstraints": {"maxWallClockTime": huge}},
        ),
        400,
        "InvalidPropertyValue",
        "taskConstraints.maxWallClockTime",
    )
    assert await api.names("/workitems") == ["wi"]
    assert await api.names(f"/workitems/wi/jobs/{JOB}/tasks") == []
    longest = {**WI, "name": "s", "schedule": {"recurrenceInterval": "P10675199D"}}
    assert (await api("POST", "/workitems", longest)).status_code == 201
    r = await api("GET", "/workitems/s")
    assert r.status_code == 200, r.text
    assert r.json()["executionInfo"]["nextRunTime"] == "9999-12-31T23:59:59.999999Z"
    assert sorted(await api.names("/workitems")) == ["s", "wi"]


async def test_integers_past_32_bits_are_refused_naming_the_field(api):
    """JSON numbers have no bound: 1e30 in a job's maxParallelTasks was once stored, and every
    later change of that job failed to commit with a 500. Every integer of a request is an
    Int32 (a file size an Int63)."""
    await _pool_and_workitem(api)
    job = f"/workitems/wi/jobs/{JOB}"
    for body, field in (
        ({"maxParallelTasks": 10**30}, "maxParallelTasks"),
        ({"priority": 2**31}, "priority"),
        (
            {"jobConstraints": {"maxTaskRetryCount": -(2**31) - 1}},
            "jobConstraints.maxTaskRetryCount",
        ),
    ):
        err(await api("PATCH", job, body), 400, "InvalidRequestBody", field)
    err(
        await api("POST", "/pools", {**POOL, "name": "q", "targetDedicated": 2**40}),
        400,
        "InvalidRequestBody",
        "targetDedicated",
    )
    big = {"blobSource": "http://127.0.0.1:9/x", "filePath": "x", "fileSize": 2**64}
    err(
        await api(
            "POST", f"{job}/tasks", {"name": "t", "commandLine": "true", "resourceFiles": [big]}
        ),
        400,
        "InvalidRequestBody",
        "resourceFiles[0].fileSize",
    )
    assert (await api("PATCH", job, {"maxParallelTasks": 2**31 - 1})).status_code == 200
    assert (await api("POST", f"{job}/terminate")).status_code in (200, 202)
    assert await api.names("/pools") == ["p"]
    assert await api.names(f"{job}/tasks") == []


async def test_reserved_environment_variables_are_refused(api):
    await _pool_and_workitem(api)
    tasks = f"/workitems/wi/jobs/{JOB}/tasks"
    for var in (
        "WATASK_TASK_NAME",
        "WATASK_TVM_ROOT_DIR",
        "watask_portrange_low",
        "WATASK_NEW_THING",
        "AZ_BATCH_TASK_ID",
    ):
        body = err(
            await api(
                "POST",
                tasks,
                {
                    "name": "t",
                    "commandLine": "x",
                    "environmentSettings": [
                        {"name": "OK", "value": "1"},
                        {"name": var, "value": "evil"},
                    ],
                },
            ),
            400,
            "ReservedEnvironmentVariable",
            "environmentSettings",
        )
        assert var in body["message"]["value"]
    err(
        await api(
            "POST",
            "/workitems",
            {
                **WI,
                "name": "w2",
                "commonEnvironmentSettings": [{"name": "WATASK_JOB_NAME", "value": "x"}],
            },
        ),
        400,
        "ReservedEnvironmentVariable",
        "commonEnvironmentSettings",
    )
    err(
        await api(
            "POST",
            "/pools",
            {
                "name": "q",
                "startTask": {
                    "commandLine": "x",
                    "environmentSettings": [{"name": "WATASK_POOL_NAME", "value": "x"}],
                },
            },
        ),
        400,
        "ReservedEnvironmentVariable",
        "startTask.environmentSettings",
    )
    r = await api(
        "POST",
        f"/workitems/wi/jobs/{JOB}/addtaskcollection",
        {
            "value": [
                {
                    "name": "c1",
                    "commandLine": "x",
                    "environmentSettings": [{"name": "WATASK_TVM_NAME", "value": "x"}],
                },
                {"name": "c2", "commandLine": "x"},
            ]
        },
    )
    assert r.status_code == 200
    assert [(x["status"], (x.get("error") or {}).get("code")) for x in r.json()["value"]] == [
        ("clienterror", "ReservedEnvironmentVariable"),
        ("success", None),
    ]
    assert await api.names(tasks) == ["c2"]
    assert await api.names("/workitems") == ["wi"]
    assert await api.names("/pools") == ["p"]


async def test_more_than_100_tasks_in_a_collection_is_400_and_stores_none(api):
    await _pool_and_workitem(api)
    value = [{"name": f"t{i}", "commandLine": "x"} for i in range(101)]
    body = err(
        await api("POST", f"/workitems/wi/jobs/{JOB}/addtaskcollection", {"value": value}),
        400,
        "TooManyTasks",
    )
    assert "100" in body["message"]["value"]
    assert await api.names(f"/workitems/wi/jobs/{JOB}/tasks") == []
    r = await api("POST", f"/workitems/wi/jobs/{JOB}/addtaskcollection", {"value": value[:100]})
    assert r.status_code == 200
    assert len(await api.names(f"/workitems/wi/jobs/{JOB}/tasks")) == 100


# ---------------------------------------------------------------------------- authentication


async def test_unsigned_wrongly_signed_and_stale_requests(api):
    ok = await api("GET", "/pools", query="api-version=2015-01-01")
    assert ok.status_code == 200
    err(await api("GET", "/pools", sign=False), 401, "AuthenticationFailed")
    err(await api("POST", "/pools", POOL, sign=False), 401, "AuthenticationFailed")
    err(
        await api("GET", "/pools", headers={"Authorization": "Bearer abc"}, sign=False),
        401,
        "AuthenticationFailed",
    )
    wrong = base64.b64encode(b"w" * 64).decode()
    err(await api("POST", "/pools", POOL, key=wrong), 403, "AuthenticationFailed")
    err(await api("POST", "/pools", POOL, account="intruder"), 403, "AccountNameMismatch")
    stale = format_datetime(datetime.now(UTC) - timedelta(minutes=16), usegmt=True)
    err(await api("POST", "/pools", POOL, date=stale), 403, "RequestTooOld")
    future = format_datetime(datetime.now(UTC) + timedelta(minutes=16), usegmt=True)
    err(await api("POST", "/pools", POOL, date=future), 403, "RequestTooOld")
    err(await api("GET", "/pools", date="not a date"), 403, "InvalidHeaderValue")
    # Signed for one body, sent with another (tampered in flight).
    h: dict[str, str] = {"Content-Type": "application/json", "Content-Length": "2"}
    sign_request("POST", "/pools", "", h, api.account, api.key)
    tampered = json.dumps(POOL).encode()
    h["Content-Length"] = str(len(tampered))
    r = await api.http.post(api.endpoint + "/pools", headers=h, content=tampered)
    err(r, 403, "AuthenticationFailed")
    # Signed for one path, sent to another.
    h = {}
    sign_request("GET", "/pools", "", h, api.account, api.key)
    err(await api.http.get(api.endpoint + "/workitems", headers=h), 403, "AuthenticationFailed")
    # A percent-encoded path is signed as sent (as the Azure SDKs do): authenticated, then 404.
    err(
        await api("GET", f"/workitems/nope/jobs/{JOB}/tasks/t/files/my%20file.txt"),
        404,
        "WorkItemNotFound",
    )
    # Unknown paths need a signature too (no probing without a key).
    err(await api("GET", "/nothing", sign=False), 401, "AuthenticationFailed")
    assert await api.names("/pools") == []


async def test_both_account_keys_are_accepted(api):
    assert len(api.keys) == 2
    assert api.keys[0] != api.keys[1]
    for key in api.keys:
        r = await api("POST", "/pools", {**POOL, "name": f"p{api.keys.index(key)}"}, key=key)
        assert r.status_code == 201, r.text
    assert sorted(await api.names("/pools")) == ["p0", "p1"]


async def test_bad_list_filters(api):
    await _pool_and_workitem(api)
    tasks = f"/workitems/wi/jobs/{JOB}/tasks"
    err(await api("GET", tasks, query="%24filter=name%20eq%20%27x%27"), 400, "InvalidFilter")
    err(await api("GET", tasks, query="state=finished"), 400, "InvalidPropertyValue", "state")
    r = await api("GET", tasks, query="%24filter=state%20eq%20%27active%27")
    assert r.status_code == 200
    assert r.json()["value"] == []
