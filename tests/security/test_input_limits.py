"""Outsider limits over a real coordinator (HTTP): command-line size and NUL, zero durations, paging,
and a poison command line that reaches an agent anyway must not stall it.

Raw signed requests (tests.integration.test_rest_bad_input.Raw) so the wire shape is what is checked;
the Python client is checked for following odata.nextLink."""

from __future__ import annotations

import sys

import pytest
import trio

from coordinator.client import Client, task_spec
from coordinator.common import models as m
from tests.harness import cluster_ctx
from tests.integration.test_rest_bad_input import Raw, err

JOB = "job-0000000001"
TASKS = f"/workitems/wi/jobs/{JOB}/tasks"
POOL = {"name": "p", "vmSize": "small", "targetDedicated": 0}
WI = {"name": "wi", "jobExecutionEnvironment": {"poolName": "p"}}


@pytest.fixture
async def env(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        raw = Raw(c.rc.endpoint, c.rc.account, c.rc.key)
        try:
            assert (await raw("POST", "/pools", POOL)).status_code == 201
            assert (await raw("POST", "/workitems", WI)).status_code == 201
            yield c, raw
        finally:
            await raw.http.aclose()


# ---------------------------------------------------------------------------- command lines


async def test_command_line_over_8191_characters_is_400_naming_the_field(env):
    c, api = env
    body = err(
        await api("POST", TASKS, {"name": "long", "commandLine": "x" * 8192}),
        400,
        "InvalidPropertyValue",
        "commandLine",
    )
    assert "8191" in body["message"]["value"]
    assert (
        await api("POST", TASKS, {"name": "edge", "commandLine": "x" * 8191})
    ).status_code == 201
    start = {"commandLine": "y" * 8192}
    err(
        await api("POST", "/pools", {**POOL, "name": "p2", "startTask": start}),
        400,
        "InvalidPropertyValue",
        "startTask.commandLine",
    )
    jm = {"name": "jm", "commandLine": "z" * 8192}
    err(
        await api("POST", "/workitems", {**WI, "name": "w2", "jobManager": jm}),
        400,
        "InvalidPropertyValue",
        "jobManager.commandLine",
    )
    # A 1.6 MB one (the reported attack) is refused the same way.
    err(
        await api("POST", TASKS, {"name": "huge", "commandLine": "a" * 1_600_000}),
        400,
        "InvalidPropertyValue",
        "commandLine",
    )
    assert await api.names(TASKS) == ["edge"]
    assert await api.names("/pools") == ["p"]
    assert await api.names("/workitems") == ["wi"]


async def test_long_command_line_in_a_collection_fails_that_task_only(env):
    c, api = env
    tasks = [
        {"name": "a", "commandLine": "true"},
        {"name": "b", "commandLine": "x" * 9000},
        {"name": "c", "commandLine": "true"},
    ]
    r = await api("POST", f"/workitems/wi/jobs/{JOB}/addtaskcollection", {"value": tasks})
    assert r.status_code == 200, r.text
    results = r.json()["value"]
    assert [x["status"] for x in results] == ["success", "clienterror", "success"]
    assert results[1]["error"]["code"] == "InvalidPropertyValue"
    assert {"key": "field", "value": "commandLine"} in results[1]["error"]["values"]
    assert await api.names(TASKS) == ["a", "c"]


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"commandLine": "echo a\u0000b"}, "commandLine"),
        (
            {"commandLine": "true", "environmentSettings": [{"name": "A", "value": "x\u0000y"}]},
            "environmentSettings[0].value",
        ),
        (
            {"commandLine": "true", "environmentSettings": [{"name": "A\u0000B", "value": "x"}]},
            "environmentSettings[0].name",
        ),
        (
            {
                "commandLine": "true",
                "resourceFiles": [{"blobSource": "http://127.0.0.1:1/x", "filePath": "a\u0000b"}],
            },
            "resourceFiles[0].filePath",
        ),
    ],
)
async def test_nul_is_400_naming_the_field_and_nothing_is_stored(env, task, field):
    c, api = env
    err(await api("POST", TASKS, {"name": "t", **task}), 400, "InvalidPropertyValue", field)
    assert await api.names(TASKS) == []


async def test_nul_in_a_start_task_is_refused(env):
    c, api = env
    start = {"commandLine": "true", "environmentSettings": [{"name": "K", "value": "\u0000"}]}
    err(
        await api("POST", "/pools", {**POOL, "name": "p2", "startTask": start}),
        400,
        "InvalidPropertyValue",
        "startTask.environmentSettings[0].value",
    )
    assert await api.names("/pools") == ["p"]


# ---------------------------------------------------------------------------- zero durations


async def test_zero_max_wall_clock_time_is_refused_not_unlimited(env):
    c, api = env
    for zero in ("PT0S", "P0D", "PT0H0M0S"):
        body = err(
            await api(
                "POST",
                TASKS,
                {"name": "t", "commandLine": "true", "taskConstraints": {"maxWallClockTime": zero}},
            ),
            400,
            "InvalidPropertyValue",
            "taskConstraints.maxWallClockTime",
        )
        assert "zero" in body["message"]["value"]
    assert await api.names(TASKS) == []
    err(
        await api(
            "POST",
            "/workitems",
            {**WI, "name": "w2", "jobConstraints": {"maxWallClockTime": "PT0S"}},
        ),
        400,
        "InvalidPropertyValue",
        "jobConstraints.maxWallClockTime",
    )
    assert await api.names("/workitems") == ["wi"]
    # An update cannot turn a limit into "unlimited" by sending zero either.
    assert (
        await api(
            "POST",
            TASKS,
            {"name": "u", "commandLine": "true", "taskConstraints": {"maxWallClockTime": "PT1H"}},
        )
    ).status_code == 201
    err(
        await api("PATCH", f"{TASKS}/u", {"taskConstraints": {"maxWallClockTime": "PT0S"}}),
        400,
        "InvalidPropertyValue",
        "taskConstraints.maxWallClockTime",
    )
    assert (await api("GET", f"{TASKS}/u")).json()["taskConstraints"]["maxWallClockTime"] == "PT1H"


async def test_zero_retention_time_means_zero(env):
    c, api = env
    r = await api(
        "POST",
        TASKS,
        {"name": "t", "commandLine": "true", "taskConstraints": {"retentionTime": "PT0S"}},
    )
    assert r.status_code == 201, r.text
    assert (await api("GET", f"{TASKS}/t")).json()["taskConstraints"]["retentionTime"] == "PT0S"


# ---------------------------------------------------------------------------- paging


async def test_2500_tasks_come_in_pages_and_the_client_returns_all(env):
    c, api = env
    names = [f"t{i:05d}" for i in range(2500)]
    for i in range(0, len(names), 100):
        r = await api(
            "POST",
            f"/workitems/wi/jobs/{JOB}/addtaskcollection",
            {"value": [{"name": n, "commandLine": "true"} for n in names[i : i + 100]]},
        )
        assert r.status_code == 200, r.text
    seen: list[str] = []
    pages = 0
    query = "maxresults=1000"
    while True:
        r = await api("GET", TASKS, query=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["value"]) <= 1000
        seen += [t["name"] for t in body["value"]]
        pages += 1
        link = body.get("odata.nextLink")
        if not link:
            break
        assert link.startswith(c.rc.endpoint + TASKS + "?"), link
        query = link.split("?", 1)[1]
    assert pages == 3
    assert seen == names
    # The default page is 1,000 too, and a small maxresults is kept across pages.
    first = (await api("GET", TASKS)).json()
    assert len(first["value"]) == 1000
    assert "odata.nextLink" in first
    small = (await api("GET", TASKS, query="maxresults=7")).json()
    assert len(small["value"]) == 7
    assert "maxresults=7" in small["odata.nextLink"]
    # The Python client follows nextLink: all 2,500, in order.
    listed = await c.client.tasks.list("wi", JOB)
    assert [t.name for t in listed] == names

    def sync_list() -> list[str]:  # the CLI's client
        with Client(c.rc.endpoint, c.rc.account, c.rc.key) as client:
            return [t.name for t in client.tasks.list("wi", JOB)]

    assert await trio.to_thread.run_sync(sync_list) == names


async def test_deleting_while_paging_neither_repeats_nor_skips(env):
    c, api = env
    r = await api(
        "POST",
        f"/workitems/wi/jobs/{JOB}/addtaskcollection",
        {"value": [{"name": f"t{i}", "commandLine": "true"} for i in range(10)]},
    )
    assert r.status_code == 200
    first = (await api("GET", TASKS, query="maxresults=4")).json()
    assert [t["name"] for t in first["value"]] == ["t0", "t1", "t2", "t3"]
    assert (await api("DELETE", f"{TASKS}/t1")).status_code == 200
    second = (await api("GET", TASKS, query=first["odata.nextLink"].split("?", 1)[1])).json()
    assert [t["name"] for t in second["value"]] == ["t4", "t5", "t6", "t7"]


@pytest.mark.parametrize(
    "path",
    ["/pools", "/workitems", "/workitems/wi/jobs", TASKS, "/certificates", "/vmsizes", "/files"],
)
@pytest.mark.parametrize("bad", ["0", "1001", "abc", "-1", "1e3"])
async def test_bad_maxresults_is_a_clear_400(env, path, bad):
    c, api = env
    body = err(
        await api("GET", path, query=f"maxresults={bad}"),
        400,
        "InvalidQueryParameterValue",
        "maxresults",
    )
    assert "1000" in body["message"]["value"]


async def test_forged_skiptoken_is_a_clear_400(env):
    c, api = env
    err(
        await api("GET", "/pools", query="$skiptoken=not-a-token"),
        400,
        "InvalidQueryParameterValue",
        "$skiptoken",
    )


async def test_every_list_route_pages(env):
    c, api = env
    for i in range(3):
        assert (await api("POST", "/pools", {**POOL, "name": f"q{i}"})).status_code == 201
        assert (await api("POST", "/workitems", {**WI, "name": f"w{i}"})).status_code == 201
    for path in ("/pools", "/workitems", "/vmsizes"):
        body = (await api("GET", path, query="maxresults=1")).json()
        assert len(body["value"]) == 1, (path, body)
        assert body.get("odata.nextLink"), (path, body)
    assert len(await c.client.pools.list()) == 4
    assert len(await c.client.workitems.list()) == 4


# ---------------------------------------------------------------------------- poison on the agent


async def test_poison_command_line_sent_anyway_does_not_stall_the_agent(nursery, tmp_path):
    """An old coordinator (or any path around the REST check) hands the agent a 400 kB one-word
    command line: shlex.split on the event loop took tens of seconds and the TVM was declared lost.
    Now the task fails with a UserError and a task beside it runs at once."""
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
        await c.client.workitems.add("wi", "p")
        core = c.rc.service.core
        # The coordinator's own core, below the REST check: what an older coordinator would send.
        await c.rc.service.execute(
            core.add_task, "wi", JOB, m.TaskAdd(name="poison", command_line="a" * 400_000)
        )
        await c.wait_for(lambda: _state(c, "poison") != "active", what="the poison task dispatched")
        await c.client.tasks.add("wi", JOB, "quick", f"{sys.executable} -c pass")
        # Liveness, loosely: the stalled loop took tens of seconds; now it is a moment.
        quick = await c.wait_for(
            lambda: _completed(c, "quick"), timeout=5, what="a task beside the poison"
        )
        assert quick.execution_info.exit_code == 0
        poison = await c.wait_for(lambda: _completed(c, "poison"), what="the poison task failed")
        failure = poison.execution_info.scheduling_error
        assert failure is not None, poison
        assert failure.category == "UserError", poison
        assert "8191" in failure.message
        # The agent is still there (not lost) and still runs tasks.
        tvms = await c.client.tvms.list("p")
        assert [t.state for t in tvms] in (["idle"], ["running"])
        await c.client.tasks.add_many("wi", JOB, [task_spec("after", f"{sys.executable} -c pass")])
        await c.wait_for(lambda: _completed(c, "after"), what="a task after the poison")


def _state(c, name: str) -> str:
    return c.rc.service.core.get_task("wi", JOB, name)[1].state


async def _completed(c, name: str):
    t = await c.client.tasks.get("wi", JOB, name)
    return t if t.state == "completed" else None
