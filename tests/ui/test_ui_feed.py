"""The live feed: snapshots are coalesced (one build per view per interval, however many readers),
and the SSE stream sends a view again when it changed."""

from __future__ import annotations

import json

import httpx2

from coordinator.core import CoordinatorState
from coordinator.rest.ui import feed as feedmod
from coordinator.rest.ui.feed import Feed
from tests.harness import cluster_ctx
from tests.ui.uihelp import logged_in


def test_snapshots_are_coalesced_per_view_and_interval() -> None:
    now = [1000.0]
    f = Feed(CoordinatorState("acct"), interval=1.0, clock=lambda: now[0])
    first = [f.snapshot("overview:") for _ in range(50)]
    assert f.computed == 1
    assert len(set(first)) == 1
    f.snapshot("throughput:")
    assert f.computed == 2  # another view is its own snapshot
    now[0] += 0.5
    f.snapshot("overview:")
    assert f.computed == 2  # still within the interval
    now[0] += 0.6
    f.snapshot("overview:")
    assert f.computed == 3
    # A costly view waits DUTY_FACTOR times its cost, even past the interval.
    at, body, _ = f._cache["overview:"]
    f._cache["overview:"] = (at, body, 0.1)
    now[0] += 2.0
    f.snapshot("overview:")
    assert f.computed == 3
    now[0] += 0.1 * feedmod.DUTY_FACTOR
    f.snapshot("overview:")
    assert f.computed == 4


def test_unknown_views_answer_an_error_and_the_cache_stays_bounded() -> None:
    f = Feed(CoordinatorState("acct"), interval=1.0)
    body = json.loads(f.snapshot("nonsense:"))
    assert body["error"]["code"] == "ResourceNotFound"
    assert json.loads(f.snapshot("pool:nope"))["error"]["code"] == "PoolNotFound"
    for i in range(feedmod.MAX_VIEWS + 50):
        f.snapshot(f"job:wi/j{i}")
    assert len(f._cache) <= feedmod.MAX_VIEWS


async def test_event_stream_sends_the_view_again_when_it_changes(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        c.rc.app.ui.feed.interval = 0.1
        hdrs = await logged_in(http, c.client)
        seen: list[dict] = []
        async with http.stream("GET", "/ui/events", params={"view": "overview"}, headers=hdrs) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            async for line in s.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen.append(json.loads(line[6:]))
                if len(seen) == 1:
                    assert seen[0]["pools"] == []
                    await c.client.pools.add("p", target_dedicated=0)
                elif [p["name"] for p in seen[-1]["pools"]] == ["p"]:
                    break
        assert len(seen) >= 2


async def test_tvm_ui_prints_a_one_time_login_url(nursery, tmp_path):
    import subprocess
    import sys

    import trio

    from tests.harness import agent_env

    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):

        def tvm_ui(key: str, *extra: str) -> subprocess.CompletedProcess[str]:
            env = agent_env(
                {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": key}
            )
            return subprocess.run(
                [sys.executable, "-m", "coordinator", "ui", *extra],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        done = await trio.to_thread.run_sync(tvm_ui, c.rc.key, "--allow-actions")
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.startswith(c.rc.endpoint.rstrip("/") + "/ui/login?token=")
        assert c.rc.key not in url
        assert "actions allowed" in done.stderr
        first = await http.get(url)
        assert first.status_code == 200
        assert "set-cookie" in first.headers
        assert (await http.get(url)).status_code == 401
        as_json = await trio.to_thread.run_sync(tvm_ui, c.rc.key, "-o", "json")
        got = json.loads(as_json.stdout)
        assert (got["write"], got["expiresInSeconds"]) == (False, 120)
        assert (await http.get(got["url"])).status_code == 200
        # A wrong key gets no link, and says why.
        bad = await trio.to_thread.run_sync(tvm_ui, "d3Jvbmc=")
        assert bad.returncode != 0
        assert "error" in bad.stderr
        assert "/ui/login" not in bad.stdout


async def test_event_stream_ends_when_the_session_ends(nursery, tmp_path):
    import trio

    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        c.rc.app.ui.feed.interval = 0.1
        hdrs = await logged_in(http, c.client)
        events = 0
        with trio.fail_after(30):  # a guard against a hang, not a timing check
            async with http.stream("GET", "/ui/events", headers=hdrs) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
                        if events == 1:
                            r = await http.post("/ui/logout", headers=hdrs)
                            assert r.status_code == 200
                # The loop ends: the server closed the stream after the logout.
        assert events >= 1
