"""REST API (ASGI, served by hypercorn's Trio worker) and the agent websocket endpoint.

Routing is a small table of (method, pattern) -> handler; every handler answers a msgspec Struct
(or raw bytes for files). Errors leave as `{code, message: {lang, value}, values}`.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.sharedkey import AuthError, verify
from coordinator.common.validation import json_error
from coordinator.core import CoordinatorState
from coordinator.runtime.filestore import FileStore
from coordinator.runtime.journal import server_busy
from coordinator.runtime.service import CoordinatorService

from . import jobscope, paging
from .inputlimits import check_request
from .limits import BodyStream, decode_depth_error, json_body_limit, read_body

# Returns once the client of the request being answered has closed its connection (never where that
# cannot be seen): a long wait (waitForCompletion) ends there, with nobody left to answer.
CLIENT_GONE: contextvars.ContextVar[Callable[[], Awaitable[None]]] = contextvars.ContextVar(
    "tvm_client_gone"
)


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """(after the body was read) ASGI says a client left with `http.disconnect`."""
    while (await receive())["type"] != "http.disconnect":
        pass


_json = msgspec.json.Encoder()
Handler = Callable[..., Awaitable[Any]]
MAX_FILE_CHUNK = 4 * 1024 * 1024
# More REST requests than this at once are answered 503 ServerBusy with Retry-After at once,
# before authentication or reading a body: an overload sheds work instead of queueing it.
MAX_INFLIGHT = 1024


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(
        self, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


def _json_response(status: int, obj: Any) -> Response:
    return Response(
        status, _json.encode(obj), [(b"content-type", b"application/json; odata=minimalmetadata")]
    )


def _has_body(scope: dict) -> bool:
    for k, v in scope["headers"]:
        if k == b"transfer-encoding" or (k == b"content-length" and v.strip() not in (b"", b"0")):
            return True
    return False


def _error_response(exc: ApiError) -> Response:
    body = m.ErrorBody(
        code=exc.code,
        message=m.ErrorMessage(value=exc.message),
        values=[m.ErrorDetail(key=k, value=v) for k, v in exc.values.items()],
    )
    resp = _json_response(exc.status, body)
    resp.headers.append((b"x-tvm-error-code", exc.code.encode()))  # HEAD answers have no body
    if exc.retry_after is not None:
        resp.headers.append((b"retry-after", str(exc.retry_after).encode()))
    return resp


_ERR_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_ERR_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<name>[^`]+)`")


def _error_field(text: str) -> str:
    """The JSON path a msgspec error is about ("startTask.commandLine", "value[3].name", "")."""
    at = _ERR_AT.search(text)
    path = at["path"].lstrip(".") if at else ""
    # Missing and unknown fields are reported at their parent object: add the field's own name.
    named = _ERR_FIELD.match(text)
    if named:
        path = f"{path}.{named['name']}" if path else named["name"]
    return path


_S = TypeVar("_S", bound=msgspec.Struct)


def _decode(body: bytes, typ: type[_S], *, check: bool = True) -> _S:
    if not body:
        raise bad_request("MissingRequestBody", "the request needs a JSON body")
    try:
        req = msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = _error_field(text)
        values = {"field": field} if field else {}
        raise bad_request("InvalidRequestBody", f"invalid request body: {text}", **values) from None
    except msgspec.DecodeError as exc:
        why = json_error(body, exc)
        raise bad_request("InvalidRequestBody", f"the body is not valid JSON: {why}") from None
    except UnicodeDecodeError as exc:  # msgspec checks a string's UTF-8 as it decodes it
        raise bad_request("InvalidRequestBody", f"the body is not valid UTF-8: {exc}") from None
    except RecursionError:
        raise decode_depth_error() from None
    if getattr(req, "azure", None) is not None:  # only the Azure routes may set it
        raise bad_request(
            "InvalidRequestBody", "invalid request body: unknown field `azure`", field="azure"
        )
    if check:
        check_request(
            req
        )  # command-line length, NUL, zero wall clock: refused before anything is stored
    return req


RouteAdder = Callable[[str, str, Handler], None]


class Dispatcher:
    """The ASGI application: authentication, body limits, the route table and error rendering.
    Route groups (`routes_*.py`) add their handlers to it; see `app.make_app`."""

    def __init__(
        self, service: CoordinatorService, files: FileStore, *, max_upload_size: int
    ) -> None:
        self.svc = service
        self.core: CoordinatorState = service.core
        self.files = files
        self.max_upload_size = max_upload_size
        self.requests = 0
        self.inflight = 0  # REST requests being answered (waiting GETs included)
        self.max_inflight = MAX_INFLIGHT
        self.ui: Any = None  # the dashboard (rest/ui), mounted at /ui by app.make_app
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        # The Azure Batch API (coordinator/rest/azure): requests carrying its api-version go there.
        self.azure: Any = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + "$"), handler))

    # ------------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":
            from coordinator.runtime.links import serve_agent

            await serve_agent(self.svc, scope, receive, send)
            return
        if kind != "http":
            return
        path = scope["path"]
        if self.ui is not None and (path == "/ui" or path.startswith("/ui/")):
            # The dashboard's own cookie session replaces SharedKey on /ui paths only.
            await self.ui(scope, receive, send)
            return
        status, headers, body = await self.answer(scope, receive)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def answer(
        self, scope: dict, receive: Callable
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """A request of the REST API (not /ui, not a websocket): status, headers (a Content-Length
        among them; `connection: close` when the body was not read to its end) and body."""
        body_read = False

        async def tracked() -> dict:
            nonlocal body_read
            msg = await receive()
            body_read = msg["type"] != "http.request" or not msg.get("more_body")
            return msg

        if self.inflight >= self.max_inflight:
            resp = _error_response(server_busy(f"{self.inflight} requests in progress"))
        else:
            self.inflight += 1
            try:
                resp = await self._http(scope, tracked)
            finally:
                self.inflight -= 1
        headers = resp.headers
        if not body_read and _has_body(scope):
            # Answered before its body ended (refused upload, failed signature, too large): the
            # rest of that body must not meet the client's next request on this connection.
            headers = [*headers, (b"connection", b"close")]
        # A HEAD answer may state the length of what a GET would send (file properties).
        if scope["method"] != "HEAD" or not any(k == b"content-length" for k, _ in headers):
            headers = [*headers, (b"content-length", str(len(resp.body)).encode())]
        return resp.status, headers, resp.body if scope["method"] != "HEAD" else b""

    async def _http(self, scope: dict, receive: Callable) -> Response:
        self.requests += 1
        method = scope["method"]
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        paging.REQUEST.set(
            (
                scope.get("scheme", "http"),
                headers.get("host", "localhost"),
                scope.get("raw_path", path.encode()).decode("latin-1").split("?")[0],
                query,
            )
        )
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        azure = self.azure is not None and self.azure.wants(q)
        try:
            # Agents fetch resource files from the store and put tasks' output files in it.
            agent_fetch = (
                path.startswith("/files/sha256/") or (path == "/files" and method == "POST")
            ) and self._agent_authorized(headers)
            # /metrics is for scrapers that cannot sign: aggregates only (coordinator/runtime/metrics.py).
            public = method == "GET" and path == "/metrics"
            # The signature covers the headers, not the body: check it before reading any body.
            if not agent_fetch and not public and not self._job_token_authorized(headers, path):
                try:
                    verify(
                        method,
                        scope.get("raw_path", path.encode()).decode("latin-1").split("?")[0],
                        query,
                        headers,
                        self.svc.account,
                        [k for k in self.svc.keys if k],
                        time.time(),
                    )
                except AuthError as exc:
                    raise ApiError(exc.status, exc.code, exc.message) from None
            stream: BodyStream | None = None
            if (
                path == "/files" and method == "POST"
            ):  # uploads stream to disk (FileRoutes.upload_file)
                stream = BodyStream(receive, headers, self.max_upload_size)
                body = b""
            else:
                body = await read_body(receive, headers, json_body_limit(path))
                CLIENT_GONE.set(functools.partial(_until_disconnect, receive))
            if azure:
                return await self.azure.handle(method, path, body, q, headers)
            for meth, pattern, handler in self._routes:
                if meth != method:
                    continue
                match = pattern.match(path)
                if match:
                    # scope["path"] is already percent-decoded (ASGI): decoding again would turn a
                    # file named "a%41" into "aA".
                    params = match.groupdict()
                    if stream is not None:
                        params["stream"] = stream
                    return await handler(body=body, query=q, headers=headers, **params)
            seed_path = any(p.match(path) for _, p, _ in self._routes)
            if not seed_path and self.azure is not None and self.azure.matches(path):
                azure = True  # an Azure-only path without a supported api-version: Azure's 400
                self.azure.check_version(q)
            if seed_path:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
            raise ApiError(404, "ResourceNotFound", f"no such resource: {path}")
        except ApiError as exc:
            return self.azure.error(exc, headers) if azure else _error_response(exc)
        except Exception as exc:  # a bug must not take the server down; say so clearly
            import logging

            logging.getLogger("tvm.api").exception("internal error on %s %s", method, path)
            err = ApiError(500, "InternalError", f"internal error: {type(exc).__name__}")
            return self.azure.error(err, headers) if azure else _error_response(err)

    def _agent_authorized(self, headers: dict[str, str]) -> bool:
        # An enrolled agent proves its own credential; the account join token is still accepted.
        agent_id = headers.get("x-tvm-agent-id", "")
        if agent_id:
            try:
                t = int(headers.get("x-tvm-agent-proof-time", ""))
            except ValueError:
                return False
            return self.svc.auth.check_http_proof(
                agent_id, headers.get("x-tvm-agent-proof", ""), t, time.time()
            )
        token = headers.get("x-tvm-agent-token")
        if not token:
            return False
        return self.svc.check_token(token)

    def _job_token_authorized(self, headers: dict[str, str], path: str) -> bool:
        """A job manager's credential (`Authorization: TVMJobToken <token>`, issue 6): valid for its
        own job's resources only; 401 if unknown, 403 anywhere else. False: not such a request."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme not in jobscope.SCHEMES:
            return False
        job = self.core.job_for_token(token.strip())
        if job is None:
            raise ApiError(
                401,
                "AuthenticationFailed",
                "the job credential is not valid (unknown or deleted job)",
            )
        scopes = jobscope.job_scopes(self.core, job)
        base = scopes[0]
        if not jobscope.in_scope(path, scopes):
            raise ApiError(
                403,
                "AuthorizationFailure",
                f"this job-manager credential is valid only for {' and '.join(scopes)} and their "
                f"tasks, not {path}",
                scope=base,
            )
        return True


class RouteGroup:
    """One area's routes (a `routes_*.py` module), over the dispatcher's service, core and files."""

    def __init__(self, app: Dispatcher) -> None:
        self.app = app
        self.svc = app.svc
        self.core = app.core
        self.files = app.files

    def register(self, r: RouteAdder) -> None:
        raise NotImplementedError
