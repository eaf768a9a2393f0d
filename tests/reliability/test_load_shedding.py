"""Load: concurrent clients adding and listing (paged) while tasks run on real agents, with no
error but the documented throttling; and that throttling itself: over `max_inflight` requests at
once, or with too many writes waiting for the disk, the coordinator answers 503 ServerBusy with
Retry-After before doing anything."""

from __future__ import annotations

import pytest
import trio

from benchmarks.reliability import load
from coordinator.runtime import service as service_mod
from tests.harness import cluster_ctx
from tests.reliability._h5support import raw

JOB = "job-0000000001"


def _busy(resp) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["code"] == "ServerBusy"
    assert resp.headers["x-tvm-error-code"] == "ServerBusy"
    assert int(resp.headers["retry-after"]) >= 1


async def test_requests_over_the_inflight_limit_are_shed(tmp_path, nursery) -> None:
    async with cluster_ctx(nursery, tmp_path) as c:
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "t", "/bin/true")  # no agent: it stays active
        app = c.rc.app
        app.max_inflight = 3
        path = f"/workitems/wi/jobs/{JOB}/tasks/t"
        async with trio.open_nursery() as waiting:
            for _ in range(3):  # three waiting GETs hold every slot for 3 s
                waiting.start_soon(raw, c.client, "GET", path, None, {"waitForCompletion": "PT3S"})
            await c.wait_for(lambda: app.inflight == 3, 10, "three requests in flight")
            _busy(await raw(c.client, "POST", f"/workitems/wi/jobs/{JOB}/tasks", {"name": "x"}))
            _busy(await raw(c.client, "GET", "/pools"))
        assert app.inflight == 0
        resp = await raw(c.client, "GET", f"/workitems/wi/jobs/{JOB}/tasks/x")
        assert resp.status_code == 404  # the refused add changed nothing
        resp = await raw(c.client, "GET", "/pools")
        assert resp.status_code == 200


async def test_commands_are_refused_while_the_journal_backlog_is_over_its_limit(
    tmp_path, nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster_ctx(nursery, tmp_path) as c:
        await c.client.workitems.add("wi", "p")
        monkeypatch.setattr(service_mod, "MAX_JOURNAL_BACKLOG", -1)  # any backlog is too much
        body = {"name": "t", "commandLine": "/bin/true"}
        _busy(await raw(c.client, "POST", f"/workitems/wi/jobs/{JOB}/tasks", body))
        monkeypatch.setattr(service_mod, "MAX_JOURNAL_BACKLOG", 200_000)
        assert (await raw(c.client, "GET", f"/workitems/wi/jobs/{JOB}/tasks/t")).status_code == 404
        assert (
            await raw(c.client, "POST", f"/workitems/wi/jobs/{JOB}/tasks", body)
        ).status_code == 201


async def test_concurrent_clients_add_and_list_while_tasks_run(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As tests/harness.py: task users could not reach tasks below pytest's tmp_path (0700).
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")
    row = await load.load_run(str(tmp_path), clients=10, tasks=120, agents=2, slots=4)
    assert row["errors"] == 0, row["first_errors"]
    assert row["tasks_added"] == row["tasks_completed"] == row["tasks_succeeded"] == 120, row
    assert row["list_requests"] > 0
    assert row["add_requests"] >= 120


@pytest.mark.slow
def test_full_size_load() -> None:
    (row,) = load.run(full=True)
    assert row["errors"] == 0, row["first_errors"]
    assert row["tasks_completed"] == row["tasks"]
