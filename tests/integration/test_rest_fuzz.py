"""Bad input at random, over real HTTP: valid request bodies of both APIs (the seed's and Azure's),
changed at random places into values of the wrong type or size (huge numbers, long strings, nulls,
empty and repeated lists, durations past the longest, unknown fields). Whatever the change, the
answer is never a 5xx, a refused request changes nothing its listing or its object shows, and
every listing still answers afterwards (a value stored that cannot be shown or journaled once made
one object fail every later request with a 500).

Seeded, so a failure repeats: TVM_FUZZ_SEED and TVM_FUZZ_N choose other runs."""

from __future__ import annotations

import json
import os
import random
from typing import Any

from tests.azure.wire import AV, pool_body
from tests.integration.test_rest_bad_input import JOB, Raw, raw_cluster

SEED = int(os.environ.get("TVM_FUZZ_SEED", "1"))
N = int(os.environ.get("TVM_FUZZ_N", "600"))

# What a changed place gets: wrong types, edges of ranges and sizes.
ODD: list[Any] = [
    None, "", " ", "x" * 5000, -1, 0, 2**31, 2**63, -(2**63), 10**30, 1.5e308, 0.5, True, [], {},
    [None], {"a": None}, "P", "PT-1S", "P99999999D", "P10675199D", "\u0000", "é", "0", "-1",
]  # fmt: skip
TASKS = f"/workitems/wi/jobs/{JOB}/tasks"
# (method, path, a valid body, where its object is listed or shown)
NATIVE: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "POST",
        "/pools",
        {
            "name": "p2",
            "vmSize": "small",
            "targetDedicated": 0,
            "maxTasksPerVM": 2,
            "startTask": {
                "commandLine": "true",
                "environmentSettings": [{"name": "A", "value": "b"}],
                "maxTaskRetryCount": 1,
            },
            "metadata": [{"name": "m", "value": "v"}],
            "tvmFillType": "spread",
            "resizeTimeout": "PT15M",
        },
        "/pools",
    ),
    (
        "POST",
        "/workitems",
        {
            "name": "wi2",
            "jobExecutionEnvironment": {"poolName": "p"},
            "priority": 5,
            "jobConstraints": {"maxWallClockTime": "PT1H", "maxTaskRetryCount": 2},
            "jobManager": {"name": "jm", "commandLine": "true", "killJobOnCompletion": True},
            "schedule": {"recurrenceInterval": "PT1H"},
        },
        "/workitems",
    ),
    (
        "POST",
        TASKS,
        {
            "name": "t",
            "commandLine": "/bin/true",
            "requiredSlots": 1,
            "resourceFiles": [{"blobSource": "http://127.0.0.1:9/x", "filePath": "x"}],
            "environmentSettings": [{"name": "A", "value": "b"}],
            "taskConstraints": {"maxWallClockTime": "PT1M", "retentionTime": "PT1H"},
            "dependsOn": {"taskIds": ["a"]},
        },
        TASKS,
    ),
    (
        "PATCH",
        "/workitems/wi",
        {"priority": 3, "jobConstraints": {"maxWallClockTime": "PT2H", "maxTaskRetryCount": 1}},
        "/workitems/wi",
    ),
    ("PATCH", f"/workitems/wi/jobs/{JOB}", {"priority": 2, "maxParallelTasks": 4}, "/workitems/wi"),
    ("POST", "/pools/p/resize", {"targetDedicated": 0, "resizeTimeout": "PT10M"}, "/pools/p"),
    (
        "POST",
        "/pools/p/evaluateautoscale",
        {"autoScaleFormula": "$TargetDedicated = min(2, $PendingTasks.GetSample(1));"},
        "/pools/p",
    ),
    ("POST", "/agenttokens", {"expiresIn": "PT1H", "singleUse": True}, "/agenttokens"),
    (
        "POST",
        f"/workitems/wi/jobs/{JOB}/addtaskcollection",
        {"value": [{"name": "c1", "commandLine": "true"}, {"name": "c2", "commandLine": "true"}]},
        TASKS,
    ),
]
AZURE: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "POST",
        "/pools",
        pool_body(
            "ap",
            taskSlotsPerNode=2,
            startTask={"commandLine": "true", "maxTaskRetryCount": 1, "waitForSuccess": True},
            metadata=[{"name": "m", "value": "v"}],
            taskSchedulingPolicy={"nodeFillType": "spread"},
        ),
        "/pools",
    ),
    (
        "POST",
        "/jobs",
        {
            "id": "aj",
            "poolInfo": {"poolId": "p"},
            "priority": 5,
            "maxParallelTasks": 3,
            "constraints": {"maxWallClockTime": "PT1H", "maxTaskRetryCount": 2},
            "jobManagerTask": {"id": "jm", "commandLine": "true", "killJobOnCompletion": True},
            "commonEnvironmentSettings": [{"name": "X", "value": "y"}],
        },
        "/jobs",
    ),
    (
        "POST",
        "/jobs/j/tasks",
        {
            "id": "t",
            "commandLine": "/bin/true",
            "constraints": {"maxWallClockTime": "PT1M", "retentionTime": "PT1H"},
            "exitConditions": {"exitCodes": [{"code": 1, "exitOptions": {"jobAction": "none"}}]},
            "multiInstanceSettings": {"numberOfInstances": 2, "coordinationCommandLine": "true"},
        },
        "/jobs/j/tasks",
    ),
    (
        "POST",
        "/jobschedules",
        {
            "id": "s",
            "schedule": {"recurrenceInterval": "PT1H", "startWindow": "PT1M"},
            "jobSpecification": {"poolInfo": {"poolId": "p"}, "priority": 1},
        },
        "/jobschedules",
    ),
    ("PATCH", "/jobs/j", {"priority": 10, "maxParallelTasks": 2}, "/jobs/j"),
    (
        "PUT",
        "/jobs/j",
        {"poolInfo": {"poolId": "p"}, "priority": 1, "constraints": {"maxTaskRetryCount": 1}},
        "/jobs/j",
    ),
    ("PATCH", "/pools/p", {"metadata": [{"name": "a", "value": "b"}]}, "/pools/p"),
    (
        "PUT",
        "/jobs/j/tasks/t0",
        {"constraints": {"maxWallClockTime": "PT1M", "retentionTime": "P1D"}},
        "/jobs/j/tasks/t0",
    ),
    ("POST", "/pools/p/resize", {"targetDedicatedNodes": 0, "resizeTimeout": "PT10M"}, "/pools/p"),
]


def _mutate(value: Any, rnd: random.Random) -> Any:
    """`value` with one place changed: a field dropped, added or given an odd value, a list item
    changed, repeated or the list made long."""
    if isinstance(value, dict) and value and rnd.random() < 0.8:
        out = dict(value)
        key = rnd.choice(list(out))
        roll = rnd.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[key + "X"] = rnd.choice(ODD)
        else:
            out[key] = _mutate(out[key], rnd)
        return out
    if isinstance(value, list) and value and rnd.random() < 0.7:
        items = list(value)
        i = rnd.randrange(len(items))
        roll = rnd.random()
        if roll < 0.2:
            items.append(items[i])
        elif roll < 0.3:
            items *= 200
        else:
            items[i] = _mutate(items[i], rnd)
        return items
    return rnd.choice(ODD)


async def _shown(api: Raw, path: str, query: str) -> Any:
    r = await api("GET", path, query=query)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    body = r.json()
    if "value" in body:  # a listing: what it names
        return sorted(x.get("id") or x.get("name") for x in body["value"])
    for volatile in ("lastModified", "eTag", "stateTransitionTime"):
        body.pop(volatile, None)
    return body


async def _run(api: Raw, cases: list[tuple[str, str, dict[str, Any], str]], query: str) -> None:
    rnd = random.Random(f"{SEED}{query}")
    failures = []
    for _ in range(N):
        method, path, valid, shown_at = rnd.choice(cases)
        body = _mutate(valid, rnd)
        before = await _shown(api, shown_at, query)
        content = json.dumps(body).encode()
        r = await api(method, path, content=content, query=query)
        what = f"{method} {path} {content[:300]!r} -> {r.status_code} {r.text[:200]}"
        if r.status_code >= 500:
            failures.append(what)
        elif r.status_code >= 400 and await _shown(api, shown_at, query) != before:
            failures.append("changed by a refused request: " + what)
        elif r.status_code == 201 and method == "POST" and path == shown_at:
            name = body.get("id") or body.get("name")  # made: removed again for the next one
            if isinstance(name, str):  # (a join token is made without one, and may stay)
                r = await api("DELETE", f"{path}/{name}", query=query)
                assert r.status_code in (200, 202), r.text
    for path in {c[3] for c in cases}:
        await _shown(api, path, query)  # still answers
    assert not failures, "\n".join(failures[:10])


async def test_changed_bodies_never_fail_the_service_nor_change_what_they_are_refused_for(
    nursery, tmp_path
):
    async with raw_cluster(nursery, tmp_path) as (_, api):
        native = {"name": "p", "vmSize": "small", "targetDedicated": 0}
        assert (await api("POST", "/pools", native)).status_code == 201
        wi = {"name": "wi", "jobExecutionEnvironment": {"poolName": "p"}}
        assert (await api("POST", "/workitems", wi)).status_code == 201
        await _run(api, NATIVE, "")
        job = {"id": "j", "poolInfo": {"poolId": "p"}}
        assert (await api("POST", "/jobs", job, query=AV)).status_code == 201
        t0 = {"id": "t0", "commandLine": "true"}
        assert (await api("POST", "/jobs/j/tasks", t0, query=AV)).status_code == 201
        await _run(api, AZURE, AV)
