"""Shared by the dashboard tests: log in over plain HTTP and read the session cookie."""

from __future__ import annotations

from typing import Any

import httpx2

from coordinator.client._http import _Call
from coordinator.rest.ui.auth import COOKIE


async def login_path(client: Any, write: bool = False) -> str:
    """A one-time login path from the signed REST call that `tvm ui` makes."""
    got = await client._call(
        _Call("POST", "/ui/api/login-token", {"write": write}, parse=lambda r: r.json())
    )
    return got["path"]


def session_cookie(resp: httpx2.Response) -> tuple[str, str]:
    """(cookie value, the whole Set-Cookie header)."""
    header = resp.headers.get("set-cookie", "")
    first = header.split(";", 1)[0]
    name, _, value = first.partition("=")
    assert name == COOKIE, header
    return value, header


async def logged_in(http: httpx2.AsyncClient, client: Any, write: bool = False) -> dict[str, str]:
    """Headers of a logged-in browser: the cookie, plus the CSRF token its page would send."""
    resp = await http.get(await login_path(client, write))
    assert resp.status_code == 200, resp.text
    sid, _ = session_cookie(resp)
    hdrs = {"cookie": f"{COOKIE}={sid}"}
    me = await http.get("/ui/api/session", headers=hdrs)
    assert me.status_code == 200, me.text
    return {**hdrs, "x-csrf-token": me.json()["csrf"]}
