"""The dashboard's access rules over plain HTTP against a real coordinator: no session, expired
session, one-time tokens, read-only sessions, CSRF, the login form, and bad input."""

from __future__ import annotations

import httpx2
import pytest

from coordinator.rest.ui.auth import COOKIE, Sessions
from tests.harness import cluster_ctx
from tests.ui.uihelp import logged_in, login_path, session_cookie

JOB = "job-0000000001"


async def _setup(c) -> None:
    await c.client.pools.add("p", target_dedicated=0)
    await c.client.workitems.add("wi", "p")


async def test_every_page_feed_and_action_refuses_without_a_session(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        await _setup(c)
        page = await http.get("/ui/")
        assert (page.status_code, page.headers["location"]) == (303, "/ui/login")
        for path in (
            "/ui/api/session",
            "/ui/api/view/overview",
            "/ui/api/view/pool/p",
            f"/ui/api/view/job/wi/{JOB}",
            f"/ui/api/tasks/wi/{JOB}",
            "/ui/api/view/throughput",
            "/ui/events?view=overview",
        ):
            r = await http.get(path)
            assert (r.status_code, r.json()["error"]["code"]) == (401, "NotLoggedIn"), path
        r = await http.post(f"/ui/api/job/wi/{JOB}/terminate", headers={"x-csrf-token": "x"})
        assert r.status_code == 401
        assert (await c.client.jobs.get("wi", JOB)).state == "active"
        # A made-up cookie is no session either.
        r = await http.get("/ui/api/view/overview", headers={"cookie": f"{COOKIE}=forged"})
        assert r.status_code == 401
        # The login page and its stylesheet are public; they hold no data.
        assert (await http.get("/ui/login")).status_code == 200
        assert (await http.get("/ui/static/style.css")).status_code == 200
        for bad in ("/ui/static/../auth.py", "/ui/static/nope.js", "/ui/static/%2e%2e/x.js"):
            # (a client may normalise the dots away: then it is an unknown page without a session)
            r = await http.get(bad)
            assert r.status_code in (401, 404), bad
            assert b"import" not in r.content, bad


async def test_one_time_login_token_gives_a_strict_httponly_expiring_cookie(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        await _setup(c)
        # Asking for a token needs the account's signature, like any REST call.
        r = await http.post("/ui/api/login-token", content=b"{}")
        assert r.status_code in (401, 403)
        path = await login_path(c.client)
        assert c.rc.key not in path
        first = await http.get(path)
        assert first.status_code == 200
        sid, header = session_cookie(first)
        attrs = {a.strip().split("=")[0].lower() for a in header.split(";")}
        assert {"httponly", "samesite", "max-age", "path"} <= attrs
        assert "SameSite=Strict" in header
        assert "Path=/ui/" in header
        assert c.rc.key not in first.text
        assert c.rc.key not in header
        # Single use: the same link again is refused and sets nothing.
        again = await http.get(path)
        assert again.status_code == 401
        assert "set-cookie" not in again.headers
        # The session reads; the account key is nowhere in what the browser gets.
        hdrs = {"cookie": f"{COOKIE}={sid}"}
        me = await http.get("/ui/api/session", headers=hdrs)
        assert me.status_code == 200
        assert me.json()["write"] is False
        ov = await http.get("/ui/api/view/overview", headers=hdrs)
        assert ov.status_code == 200
        assert [p["name"] for p in ov.json()["pools"]] == ["p"]
        assert c.rc.key not in me.text + ov.text
        # The cookie is a dashboard session only: it does not open the REST API.
        assert (await http.get("/pools", headers=hdrs)).status_code == 401
        # Expired: the session is refused once its lifetime is over.
        ui = c.rc.app.ui
        real = ui.sessions.clock
        ui.sessions.clock = lambda: real() + ui.sessions.session_ttl + 1
        try:
            assert (await http.get("/ui/api/view/overview", headers=hdrs)).status_code == 401
        finally:
            ui.sessions.clock = real
        assert (await http.get("/ui/api/view/overview", headers=hdrs)).status_code == 401


async def test_expired_login_token_is_refused(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        path = await login_path(c.client)
        ui = c.rc.app.ui
        real = ui.sessions.clock
        ui.sessions.clock = lambda: real() + ui.sessions.token_ttl + 1
        try:
            r = await http.get(path)
        finally:
            ui.sessions.clock = real
        assert r.status_code == 401
        assert "set-cookie" not in r.headers
        # Pruned while expired: it does not come back to life.
        assert (await http.get(path)).status_code == 401


async def test_actions_need_a_write_session_and_the_csrf_token(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        await _setup(c)
        url = f"/ui/api/job/wi/{JOB}/terminate"
        ro = await logged_in(http, c.client, write=False)
        r = await http.post(url, headers=ro)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "ReadOnlySession")

        rw = await logged_in(http, c.client, write=True)
        cookie_only = {"cookie": rw["cookie"]}
        for hdrs in (
            cookie_only,  # no CSRF token
            {**cookie_only, "x-csrf-token": "wrong"},
            {**cookie_only, "x-csrf-token": ro["x-csrf-token"]},  # another session's token
            {**rw, "origin": "http://evil.example"},  # the right token from a foreign page
        ):
            r = await http.post(url, headers=hdrs)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "CsrfCheckFailed")
        assert (await c.client.jobs.get("wi", JOB)).state == "active"

        # Bad input: a clear 400 and no change.
        for body in (b"", b"{}", b'{"targetDedicated": -1}', b'{"targetDedicated": "3"}', b"[1"):
            r = await http.post("/ui/api/pool/p/resize", headers=rw, content=body)
            assert r.status_code == 400, body
        assert (await c.client.pools.get("p")).target_dedicated == 0
        r = await http.post(
            "/ui/api/pool/nope/resize", headers=rw, content=b'{"targetDedicated": 1}'
        )
        assert r.status_code == 404

        r = await http.post("/ui/api/pool/p/resize", headers=rw, content=b'{"targetDedicated": 2}')
        assert r.status_code == 202
        assert (await c.client.pools.get("p")).target_dedicated == 2
        r = await http.post(url, headers=rw)
        assert r.status_code == 202
        job = await c.client.jobs.get("wi", JOB)
        assert job.state in ("terminating", "completed")

        # Logging out ends the session (CSRF-checked like any POST).
        assert (await http.post("/ui/logout", headers=cookie_only)).status_code == 403
        assert (await http.post("/ui/logout", headers=rw)).status_code == 200
        assert (await http.get("/ui/api/session", headers=rw)).status_code == 401


async def test_login_form_checks_the_key_and_bad_reads_are_400(nursery, tmp_path):
    async with (
        cluster_ctx(nursery, tmp_path) as c,
        httpx2.AsyncClient(base_url=c.rc.endpoint) as http,
    ):
        await _setup(c)
        form = {"content-type": "application/x-www-form-urlencoded"}
        bad = await http.post("/ui/login", headers=form, content=b"key=not-the-key")
        assert bad.status_code == 401
        assert "set-cookie" not in bad.headers
        assert "Wrong account key" in bad.text
        from urllib.parse import quote

        ok = await http.post("/ui/login", headers=form, content=f"key={quote(c.rc.key)}".encode())
        assert (ok.status_code, ok.headers["location"]) == (303, "/ui/")
        sid, header = session_cookie(ok)
        assert "HttpOnly" in header
        assert "SameSite=Strict" in header
        hdrs = {"cookie": f"{COOKIE}={sid}"}
        assert (await http.get("/ui/", headers=hdrs)).status_code == 200
        assert (await http.get("/ui/api/session", headers=hdrs)).json()["write"] is False
        big = await http.post("/ui/login", headers=form, content=b"key=" + b"a" * 70_000)
        assert big.status_code == 413
        for path in (
            f"/ui/api/tasks/wi/{JOB}?state=sleeping",
            f"/ui/api/tasks/wi/{JOB}?size=0",
            f"/ui/api/tasks/wi/{JOB}?page=x",
            f"/ui/api/file/wi/{JOB}/t/secret.txt",
        ):
            r = await http.get(path, headers=hdrs)
            assert r.status_code == 400, path
        assert (await http.get("/ui/api/view/pool/nope", headers=hdrs)).status_code == 404
        assert (await http.get("/ui/api/tasks/wi/nope", headers=hdrs)).status_code == 404


def test_sessions_prune_and_cap() -> None:
    now = [1000.0]
    s = Sessions(clock=lambda: now[0], session_ttl=10, token_ttl=5)
    tok = s.issue_login_token(write=True)
    sess = s.redeem(tok)
    assert sess is not None
    assert sess.write
    assert s.redeem(tok) is None
    cookie = f"a=b; {s.set_cookie(sess, secure=True).decode().split(';')[0]}"
    assert s.lookup(cookie) is sess
    assert b"Secure" in s.set_cookie(sess, secure=True)
    now[0] += 11
    assert s.lookup(cookie) is None
    with pytest.raises(AssertionError):
        assert s.lookup("")
