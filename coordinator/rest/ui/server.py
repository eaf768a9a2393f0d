"""The dashboard at /ui/: pages, JSON views, the live feed and the few actions.

Mounted by `rest.dispatch.Dispatcher` for /ui and /ui/...; these paths skip the SharedKey check
and use the dashboard session instead (`auth.py`). Only `POST /ui/api/login-token` is signed with
the account key, like any REST call (that is how `tvm ui` gets its one-time URL).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio

from coordinator.common.errors import ApiError, bad_request
from coordinator.common.sharedkey import AuthError, verify

from . import data
from .auth import Session, Sessions, csrf_ok, key_matches
from .feed import Feed

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "ui_static")
MAX_BODY = 64 * 1024
TAIL_CHUNK = 64 * 1024
TAIL_FILES = ("stdout.txt", "stderr.txt")
_STATIC_NAME = re.compile(r"[a-z0-9_-]+\.(?:js|css|html|svg)")
_TYPES = {
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "html": b"text/html; charset=utf-8",
    "svg": b"image/svg+xml",
}
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # a login URL must not leak through Referer
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]
_json = msgspec.json.Encoder()
_N = r"([^/]+)"


class Reply:
    def __init__(
        self, status: int, body: bytes = b"", ctype: bytes = b"application/json", **kw: Any
    ) -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", ctype), *_SECURITY_HEADERS]
        for k, v in kw.items():
            self.headers.append((k.replace("_", "-").encode(), v))


def _j(status: int, obj: Any) -> Reply:
    return Reply(status, _json.encode(obj))


def _err(exc: ApiError) -> Reply:
    return _j(exc.status, {"error": {"code": exc.code, "message": exc.message}})


def _redirect(location: str, status: int = 303, **kw: Any) -> Reply:
    return Reply(status, b"", b"text/plain", location=location.encode(), **kw)


def _load_assets() -> dict[str, bytes]:
    # A few small files, read once at import: no disk access on the event loop afterwards.
    out = {}
    for name in os.listdir(STATIC_DIR):
        if _STATIC_NAME.fullmatch(name):
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                out[name] = f.read()
    return out


_ASSETS = _load_assets()


def _static(name: str) -> bytes:
    return _ASSETS[name]


class UiApp:
    """ASGI handler for /ui and everything beneath it."""

    def __init__(self, dispatcher: Any, *, interval: float | None = None) -> None:
        from coordinator.rest.routes_files import FileRoutes

        self.svc = dispatcher.svc
        self.core = dispatcher.core
        self.files = FileRoutes(dispatcher)  # the task-file read path the REST API uses
        self.sessions = Sessions()
        self.feed = Feed(self.core, interval if interval is not None else _interval_from_env())
        self._get: list[tuple[re.Pattern[str], Callable[..., Any]]] = []
        self._post: list[tuple[re.Pattern[str], Callable[..., Any]]] = []
        gets: list[tuple[str, Callable[..., Any]]] = [
            (r"/ui/api/session", self.api_session),
            (r"/ui/api/view/(overview|throughput)", self.api_view),
            (rf"/ui/api/view/(pool)/{_N}", self.api_view),
            (rf"/ui/api/view/(job)/{_N}/{_N}", self.api_view),
            (rf"/ui/api/view/(task)/{_N}/{_N}/{_N}", self.api_view),
            (rf"/ui/api/tasks/{_N}/{_N}", self.api_tasks),
            (rf"/ui/api/file/{_N}/{_N}/{_N}/{_N}", self.api_file),
        ]
        for pat, fn in gets:
            self._get.append((re.compile(pat + "$"), fn))
        posts: list[tuple[str, Callable[..., Any]]] = [
            (rf"/ui/api/job/{_N}/{_N}/terminate", self.act_terminate_job),
            (rf"/ui/api/task/{_N}/{_N}/{_N}/terminate", self.act_terminate_task),
            (rf"/ui/api/pool/{_N}/resize", self.act_resize),
            (r"/ui/logout", self.act_logout),
        ]
        for pat, fn in posts:
            self._post.append((re.compile(pat + "$"), fn))

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        query = {
            k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
        }
        session = self.sessions.lookup(headers.get("cookie", ""))
        if path == "/ui/events" and scope["method"] == "GET":
            if session is None:
                return await self._send(send, _err(_unauthorized()))
            cookie = headers.get("cookie", "")
            return await self.feed.stream(
                query.get("view", "overview"),
                receive,
                send,
                lambda: self.sessions.lookup(cookie) is not None,
            )
        try:
            reply = await self._route(scope, receive, headers, path, query, session)
        except ApiError as exc:
            reply = _err(exc)
        except Exception as exc:  # a bug must not take the server down; say so clearly
            logging.getLogger("tvm.ui").exception("internal error on %s", path)
            reply = _err(ApiError(500, "InternalError", f"internal error: {type(exc).__name__}"))
        await self._send(send, reply, head=scope["method"] == "HEAD")

    async def _send(self, send: Callable, r: Reply, head: bool = False) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": r.status,
                "headers": [*r.headers, (b"content-length", str(len(r.body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head else r.body})

    async def _route(
        self,
        scope: dict,
        receive: Callable,
        headers: dict[str, str],
        path: str,
        query: dict[str, str],
        session: Session | None,
    ) -> Reply:
        method = scope["method"]
        secure = scope.get("scheme") == "https"
        if method in ("GET", "HEAD"):
            if path == "/ui":
                return _redirect("/ui/", 308)
            if path.startswith("/ui/static/"):
                name = path.removeprefix("/ui/static/")
                if not _STATIC_NAME.fullmatch(name) or name not in _ASSETS:
                    raise data.not_found(path)
                return Reply(200, _static(name), _TYPES[name.rpartition(".")[2]])
            if path == "/ui/login":
                return self._login_page(query, secure)
            if path == "/ui/":
                if session is None:
                    return _redirect("/ui/login")
                return Reply(200, _static("index.html"), _TYPES["html"])
            if session is None:
                raise _unauthorized()
            for pat, fn in self._get:
                m = pat.match(path)
                if m:
                    return await fn(*m.groups(), query=query, session=session)
            raise data.not_found(path)
        if method != "POST":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        body = await _read_body(receive, headers)
        if path == "/ui/login":
            return await self._login_form(body, secure)
        if path == "/ui/api/login-token":
            return self._signed_login_token(scope, headers, path, body)
        if session is None:
            raise _unauthorized()
        # CSRF: the per-session token must come back in a header (a cross-site form cannot set
        # one), and a browser-sent Origin must be this dashboard's own.
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if (origin and origin != own) or not csrf_ok(session, headers.get("x-csrf-token", "")):
            raise ApiError(403, "CsrfCheckFailed", "missing or wrong CSRF token for this session")
        for pat, fn in self._post:
            m = pat.match(path)
            if m:
                if fn != self.act_logout and not session.write:
                    raise ApiError(
                        403,
                        "ReadOnlySession",
                        "this dashboard session is read-only; log in with actions allowed",
                    )
                return await fn(*m.groups(), body=body, session=session)
        raise data.not_found(path)

    # ------------------------------------------------------------------ login

    def _login_page(self, query: dict[str, str], secure: bool) -> Reply:
        token = query.get("token")
        if token is None:
            return Reply(200, _static("login.html"), _TYPES["html"])
        session = self.sessions.redeem(token)
        if session is None:
            return Reply(
                401, _login_html("This login link is unknown, used or expired."), _TYPES["html"]
            )
        # A page of our own, not a redirect: the cookie is SameSite=Strict, and a same-site
        # navigation from here carries it even when the link was opened from another site.
        page = _static("loggedin.html")
        return Reply(
            200, page, _TYPES["html"], set_cookie=self.sessions.set_cookie(session, secure)
        )

    async def _login_form(self, body: bytes, secure: bool) -> Reply:
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if not key_matches(form.get("key", ""), [k for k in self.svc.keys if k]):
            await trio.sleep(0.5)  # slows guessing; the key is 64 random bytes anyway
            return Reply(401, _login_html("Wrong account key."), _TYPES["html"])
        session = self.sessions.create(write=form.get("write") == "on")
        return _redirect("/ui/", set_cookie=self.sessions.set_cookie(session, secure))

    def _signed_login_token(
        self, scope: dict, headers: dict[str, str], path: str, body: bytes
    ) -> Reply:
        raw = scope.get("raw_path", path.encode()).decode("latin-1").split("?")[0]
        try:
            verify(
                "POST",
                raw,
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                self.svc.account,
                [k for k in self.svc.keys if k],
                time.time(),
            )
        except AuthError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        try:
            req = json.loads(body) if body.strip() else {}
        except ValueError:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("write", False), bool):
            raise bad_request("InvalidRequestBody", 'the body must be {"write": true|false}')
        write = bool(req.get("write", False))
        token = self.sessions.issue_login_token(write)
        return _j(
            200,
            {
                "path": f"/ui/login?token={token}",
                "expiresInSeconds": int(self.sessions.token_ttl),
                "write": write,
            },
        )

    async def act_logout(self, *, session: Session, **_: Any) -> Reply:
        self.sessions.end(session)
        return _j(200, {"loggedOut": True})

    # ------------------------------------------------------------------ reads

    async def api_session(self, *, session: Session, **_: Any) -> Reply:
        # The CSRF token goes to the page's script (same origin only: no CORS headers here).
        return _j(
            200,
            {
                "account": self.svc.account,
                "write": session.write,
                "csrf": session.csrf,
                "interval": self.feed.interval,
            },
        )

    async def api_view(self, kind: str, *args: str, **_: Any) -> Reply:
        body = self.feed.snapshot(f"{kind}:{'/'.join(args)}" if args else f"{kind}:")
        status = 404 if body.startswith(b'{"error"') else 200
        return Reply(status, body)

    async def api_tasks(self, wi: str, job: str, *, query: dict[str, str], **_: Any) -> Reply:
        return _j(200, data.task_page(self.core, wi, job, query))

    async def api_file(
        self, wi: str, job: str, task: str, name: str, *, query: dict[str, str], **_: Any
    ) -> Reply:
        """A chunk of stdout.txt/stderr.txt from `offset` (absent: the last 64 KiB), through the
        same agent file-read path as GET .../tasks/T/files/NAME."""
        if name not in TAIL_FILES:
            raise bad_request("InvalidFilePath", f"only {' and '.join(TAIL_FILES)} can be tailed")
        raw = query.get("offset")
        try:
            offset = int(raw) if raw is not None else None
        except ValueError:
            raise bad_request("InvalidPropertyValue", "offset must be an integer") from None
        if offset is not None and offset < 0:
            raise bad_request("InvalidPropertyValue", "offset must be >= 0")
        rng = (
            f"bytes=-{TAIL_CHUNK}"
            if offset is None
            else f"bytes={offset}-{offset + TAIL_CHUNK - 1}"
        )
        try:
            resp = await self.files.get_task_file(
                wi=wi, job=job, task=task, path=name, headers={"range": rng}
            )
        except ApiError as exc:
            if exc.status == 416:  # nothing at or after the offset (or an empty file) yet
                at = offset or 0
                return _j(200, {"offset": at, "next": at, "size": at, "text": ""})
            if exc.code in (
                "TaskNotStarted",
                "FileNotFound",
                "ResourceNotFound",
            ) and exc.status in (404, 409):
                return _j(200, {"offset": 0, "next": 0, "size": 0, "text": "", "note": exc.message})
            raise
        hdr = dict(resp.headers)
        size = int(hdr.get(b"ocp-content-length", b"0"))
        start = size - len(resp.body) if offset is None else offset
        return _j(
            200,
            {
                "offset": start,
                "next": start + len(resp.body),  # in bytes: the text may hold replaced bytes
                "size": size,
                "text": resp.body.decode("utf-8", "replace"),
            },
        )

    # ------------------------------------------------------------------ actions

    async def act_terminate_job(self, wi: str, job: str, **_: Any) -> Reply:
        await self.svc.execute(self.core.terminate_job, wi, job, "terminated from the dashboard")
        return _j(202, {"terminated": f"{wi}/{job}"})

    async def act_terminate_task(self, wi: str, job: str, task: str, **_: Any) -> Reply:
        await self.svc.execute(self.core.terminate_task, wi, job, task)
        return _j(202, {"terminated": f"{wi}/{job}/{task}"})

    async def act_resize(self, pool: str, *, body: bytes, **_: Any) -> Reply:
        from coordinator.common import models as m

        target = data.resize_target(body)
        await self.svc.execute(self.core.resize_pool, pool, m.PoolResize(target_dedicated=target))
        return _j(202, {"pool": pool, "targetDedicated": target})


def _unauthorized() -> ApiError:
    return ApiError(401, "NotLoggedIn", "log in to the dashboard first (tvm ui, or /ui/login)")


def _login_html(message: str) -> bytes:
    page = _static("login.html").decode()
    return page.replace("<!--error-->", f'<p class="error">{message}</p>').encode()


def _interval_from_env() -> float:
    raw = os.environ.get("TVM_UI_INTERVAL_MS", "")
    try:
        return max(100, int(raw)) / 1000 if raw else 1.0
    except ValueError:
        return 1.0


async def _read_body(receive: Callable, headers: dict[str, str]) -> bytes:
    try:
        declared = int(headers.get("content-length", "0") or 0)
    except ValueError:
        raise bad_request("InvalidHeader", "bad Content-Length") from None
    if declared > MAX_BODY:
        raise ApiError(
            413, "RequestBodyTooLarge", f"dashboard requests are at most {MAX_BODY} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(
                413, "RequestBodyTooLarge", f"dashboard requests are at most {MAX_BODY} bytes"
            )
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks)
