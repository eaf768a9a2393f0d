"""REST API (ASGI, served by hypercorn's Trio worker) and the agent websocket endpoint.

Routing is a small table of (method, pattern) -> handler; every handler answers a msgspec Struct
(or raw bytes for files). Errors leave as `{code, message: {lang, value}, values}`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from protocol import messages as pm

from . import models as m
from .errors import ApiError, bad_request, not_found
from .filestore import FileStore, FileStoreError, parse_range_header
from .records import ACTIVE, COMPLETED, RUNNING
from .service import CoordinatorService
from .sharedkey import AuthError, verify
from .timeutil import rfc3339
from .views import job_view, pool_view, task_view, tvm_view, workitem_view

_json = msgspec.json.Encoder()
Handler = Callable[..., Awaitable[Any]]
MAX_BODY = 16 * 1024 * 1024
MAX_FILE_CHUNK = 4 * 1024 * 1024


class Response:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


def _json_response(status: int, obj: Any) -> Response:
    return Response(status, _json.encode(obj), [(b"content-type", b"application/json; odata=minimalmetadata")])


def _error_response(exc: ApiError) -> Response:
    body = m.ErrorBody(code=exc.code, message=m.ErrorMessage(value=exc.message),
                       values=[m.ErrorDetail(key=k, value=v) for k, v in exc.values.items()])
    return _json_response(exc.status, body)


def _decode(body: bytes, typ: type) -> Any:
    if not body:
        raise bad_request("MissingRequestBody", "the request needs a JSON body")
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = text.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in text else ""
        raise bad_request("InvalidRequestBody", f"invalid request body: {text}", field=field) from None
    except msgspec.DecodeError as exc:
        raise bad_request("InvalidRequestBody", f"the body is not valid JSON: {exc}") from None


class RestApp:
    def __init__(self, service: CoordinatorService, files: FileStore) -> None:
        self.svc = service
        self.core = service.core
        self.files = files
        self.requests = 0
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        r = self._route
        r("GET", r"/pools", self.list_pools)
        r("POST", r"/pools", self.add_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)", self.get_pool)
        r("DELETE", r"/pools/(?P<pool>[^/]+)", self.delete_pool)
        r("POST", r"/pools/(?P<pool>[^/]+)/resize", self.resize_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms", self.list_tvms)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)", self.get_tvm)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files", self.list_tvm_files)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files/(?P<path>.+)", self.get_tvm_file)
        r("HEAD", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files/(?P<path>.+)", self.get_tvm_file)
        r("GET", r"/workitems", self.list_workitems)
        r("POST", r"/workitems", self.add_workitem)
        r("GET", r"/workitems/(?P<wi>[^/]+)", self.get_workitem)
        r("DELETE", r"/workitems/(?P<wi>[^/]+)", self.delete_workitem)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs", self.list_jobs)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)", self.get_job)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/taskcounts", self.task_counts)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks", self.list_tasks)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks", self.add_task)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/addtaskcollection", self.add_task_collection)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)", self.get_task)
        r("PATCH", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)", self.update_task)
        r("DELETE", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)", self.delete_task)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/terminate",
          self.terminate_task)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files", self.list_task_files)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files/(?P<path>.+)",
          self.get_task_file)
        r("HEAD", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files/(?P<path>.+)",
          self.get_task_file)
        r("POST", r"/files", self.upload_file)
        r("GET", r"/files", self.list_store_files)
        r("GET", r"/files/sha256/(?P<sha>[^/]+)", self.get_store_file)
        r("HEAD", r"/files/sha256/(?P<sha>[^/]+)", self.get_store_file)
        r("GET", r"/account", self.get_account)

    def _route(self, method: str, pattern: str, handler: Handler) -> None:
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
            from .links import serve_agent

            await serve_agent(self.svc, scope, receive, send)
            return
        if kind != "http":
            return
        resp = await self._http(scope, receive)
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [*resp.headers, (b"content-length", str(len(resp.body)).encode())]})
        await send({"type": "http.response.body", "body": resp.body if scope["method"] != "HEAD" else b""})

    async def _http(self, scope: dict, receive: Callable) -> Response:
        self.requests += 1
        method = scope["method"]
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await self._read_body(receive, streaming=path == "/files" and method == "POST")
            agent_fetch = path.startswith("/files/sha256/") and self._agent_authorized(headers)
            if not agent_fetch:
                try:
                    verify(method, scope.get("raw_path", path.encode()).decode("latin-1").split("?")[0], query,
                           headers, self.svc.account, [k for k in self.svc.keys if k], time.time())
                except AuthError as exc:
                    raise ApiError(exc.status, exc.code, exc.message) from None
            for meth, pattern, handler in self._routes:
                if meth != method:
                    continue
                match = pattern.match(path)
                if match:
                    params = {k: unquote(v) for k, v in match.groupdict().items()}
                    q = {k: v[-1] for k, v in parse_qs(query).items()}
                    return await handler(body=body, query=q, headers=headers, **params)
            if any(p.match(path) for _, p, _ in self._routes):
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
            raise ApiError(404, "ResourceNotFound", f"no such resource: {path}")
        except ApiError as exc:
            return _error_response(exc)
        except Exception as exc:  # a bug must not take the server down; say so clearly
            import logging

            logging.getLogger("tvm.api").exception("internal error on %s %s", method, path)
            return _error_response(ApiError(500, "InternalError", f"internal error: {type(exc).__name__}"))

    def _agent_authorized(self, headers: dict[str, str]) -> bool:
        token = headers.get("x-tvm-agent-token")
        return bool(token) and self.svc.check_token(token)

    async def _read_body(self, receive: Callable, streaming: bool) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = 1 << 40 if streaming else MAX_BODY
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "RequestBodyTooLarge", f"request bodies are limited to {MAX_BODY} bytes")
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks)

    # ------------------------------------------------------------------ account

    async def get_account(self, **_: Any) -> Response:
        return _json_response(200, {"name": self.svc.account, "endpoint": self.svc.endpoint})

    # ------------------------------------------------------------------ pools

    async def list_pools(self, **_: Any) -> Response:
        return _json_response(200, {"value": [pool_view(self.core, p) for p in self.core.pools.values()]})

    async def add_pool(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.PoolAdd)
        await self.svc.execute(self.core.add_pool, req)
        return _json_response(201, pool_view(self.core, self.core.pools[req.name]))

    async def get_pool(self, pool: str, **_: Any) -> Response:
        return _json_response(200, pool_view(self.core, self.core.get_pool(pool)))

    async def delete_pool(self, pool: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_pool, pool)
        return Response(202)

    async def resize_pool(self, pool: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.PoolResize)
        await self.svc.execute(self.core.resize_pool, pool, req)
        return Response(202)

    async def list_tvms(self, pool: str, **_: Any) -> Response:
        return _json_response(200, {"value": [tvm_view(self.core, t) for t in self.core.pool_tvms(pool)]})

    async def get_tvm(self, pool: str, tvm: str, **_: Any) -> Response:
        return _json_response(200, tvm_view(self.core, self.core.get_tvm(pool, tvm)))

    # ------------------------------------------------------------------ workitems and jobs

    async def list_workitems(self, **_: Any) -> Response:
        return _json_response(200, {"value": [workitem_view(w) for w in self.core.workitems.values()]})

    async def add_workitem(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.WorkitemAdd)
        await self.svc.execute(self.core.add_workitem, req)
        return _json_response(201, workitem_view(self.core.workitems[req.name]))

    async def get_workitem(self, wi: str, **_: Any) -> Response:
        return _json_response(200, workitem_view(self.core.get_workitem(wi)))

    async def delete_workitem(self, wi: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_workitem, wi)
        return Response(202)

    async def list_jobs(self, wi: str, **_: Any) -> Response:
        return _json_response(200, {"value": [job_view(self.core, j) for j in self.core.workitem_jobs(wi)]})

    async def get_job(self, wi: str, job: str, **_: Any) -> Response:
        return _json_response(200, job_view(self.core, self.core.get_job(wi, job)))

    async def task_counts(self, wi: str, job: str, **_: Any) -> Response:
        return _json_response(200, {"taskCounts": self.core.task_counts(self.core.get_job(wi, job))})

    # ------------------------------------------------------------------ tasks

    async def list_tasks(self, wi: str, job: str, query: dict[str, str], **_: Any) -> Response:
        j = self.core.get_job(wi, job)
        state = query.get("state")
        flt = query.get("$filter", "")
        if not state and flt:
            mt = re.fullmatch(r"\s*state\s+eq\s+'(\w+)'\s*", flt)
            if not mt:
                raise bad_request("InvalidFilter", f"unsupported $filter {flt!r}; use state eq 'active'")
            state = mt.group(1)
        if state and state not in (ACTIVE, RUNNING, COMPLETED):
            raise bad_request("InvalidPropertyValue", "state must be active, running or completed", field="state")
        tasks = [task_view(j, t) for t in j.tasks.values() if not state or t.state == state]
        return _json_response(200, {"value": tasks})

    async def add_task(self, wi: str, job: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TaskAdd)
        await self.svc.execute(self.core.add_task, wi, job, req)
        return Response(201)

    async def add_task_collection(self, wi: str, job: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TaskAddCollection)
        results = await self.svc.execute(self.core.add_tasks, wi, job, req.value)
        return _json_response(200, m.TaskAddCollectionResult(value=results))

    async def get_task(self, wi: str, job: str, task: str, **_: Any) -> Response:
        j, t = self.core.get_task(wi, job, task)
        return _json_response(200, task_view(j, t))

    async def update_task(self, wi: str, job: str, task: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TaskUpdate)
        await self.svc.execute(self.core.update_task, wi, job, task, req)
        return Response(200)

    async def delete_task(self, wi: str, job: str, task: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_task, wi, job, task)
        return Response(200)

    async def terminate_task(self, wi: str, job: str, task: str, **_: Any) -> Response:
        await self.svc.execute(self.core.terminate_task, wi, job, task)
        return Response(204)

    # ------------------------------------------------------------------ files on TVMs

    def _task_location(self, wi: str, job: str, task: str) -> tuple[str, str]:
        j, t = self.core.get_task(wi, job, task)
        if not t.tvm:
            raise ApiError(409, "TaskNotStarted", f"task {task!r} has not run on a TVM yet; it has no files")
        tvm = self.core.tvms.get(t.tvm)
        if tvm is None:
            raise ApiError(404, "TVMNotFound", f"TVM {t.tvm!r} that ran task {task!r} is no longer in the pool")
        return tvm.rec.agent_id, f"tasks/{wi}/{job}/{task}"

    async def _ask(self, agent_id: str, req: pm.FileRequest) -> pm.FileResponse:
        resp = await self.svc.ask_agent_files(agent_id, req)
        if resp is None:
            raise ApiError(503, "TVMUnreachable", "the TVM holding these files is not connected")
        if resp.error_code:
            status = 410 if resp.error_code == "TaskFilesCleanedUp" else 404
            if resp.error_code == "InvalidRange":
                status = 416
            raise ApiError(status, resp.error_code, resp.message)
        return resp

    async def list_task_files(self, wi: str, job: str, task: str, query: dict[str, str], **_: Any) -> Response:
        agent_id, base = self._task_location(wi, job, task)
        return await self._list(agent_id, base, query)

    async def list_tvm_files(self, pool: str, tvm: str, query: dict[str, str], **_: Any) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return await self._list(t.rec.agent_id, "", query)

    async def _list(self, agent_id: str, base: str, query: dict[str, str]) -> Response:
        recursive = query.get("recursive", "false").lower() == "true"
        resp = await self._ask(agent_id, pm.FileRequest(req_id=0, op="list", path=base, recursive=recursive))
        files = [
            m.NodeFile(name=e.name, is_directory=e.is_directory,
                       properties=None if e.is_directory else m.FileProperties(
                           content_length=e.size, last_modified=rfc3339(e.mtime) or ""))
            for e in resp.entries
        ]
        return _json_response(200, {"value": files})

    async def get_task_file(self, wi: str, job: str, task: str, path: str, headers: dict[str, str], **_: Any) -> Response:
        agent_id, base = self._task_location(wi, job, task)
        return await self._read(agent_id, f"{base}/{path}", headers)

    async def get_tvm_file(self, pool: str, tvm: str, path: str, headers: dict[str, str], **_: Any) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return await self._read(t.rec.agent_id, path, headers)

    async def _read(self, agent_id: str, path: str, headers: dict[str, str]) -> Response:
        if ".." in path.split("/"):
            raise bad_request("InvalidFilePath", "file paths may not contain '..'")
        st = await self._ask(agent_id, pm.FileRequest(req_id=0, op="stat", path=path))
        try:
            rng = parse_range_header(headers.get("range", ""), st.size) if headers.get("range") else None
        except FileStoreError as exc:
            raise ApiError(416, exc.code, exc.message) from None
        start, end = rng if rng else (0, st.size - 1)
        length = max(0, end - start + 1)
        if length > MAX_FILE_CHUNK and rng is None:
            length = MAX_FILE_CHUNK  # large files: clients page with Range (the CLI does)
        data = b""
        if length:
            resp = await self._ask(agent_id, pm.FileRequest(req_id=0, op="read", path=path, offset=start,
                                                            length=min(length, MAX_FILE_CHUNK)))
            data = resp.data
        hdrs = [(b"content-type", b"application/octet-stream"),
                (b"ocp-content-length", str(st.size).encode()),
                (b"last-modified", (rfc3339(st.mtime) or "").encode()),
                (b"accept-ranges", b"bytes")]
        if rng:
            hdrs.append((b"content-range", f"bytes {start}-{start + len(data) - 1}/{st.size}".encode()))
            return Response(206, data, hdrs)
        return Response(200, data, hdrs)

    # ------------------------------------------------------------------ file store

    async def upload_file(self, body: bytes, query: dict[str, str], headers: dict[str, str], **_: Any) -> Response:
        expected = query.get("sha256") or headers.get("x-tvm-sha256") or None

        async def chunks() -> Any:
            yield body

        try:
            stored = await self.files.put(chunks(), expected_sha256=expected)
        except FileStoreError as exc:
            raise bad_request(exc.code, exc.message) from None
        return _json_response(201, {"sha256": stored.sha256, "size": stored.size,
                                     "blobSource": f"filestore:sha256:{stored.sha256}"})

    async def list_store_files(self, **_: Any) -> Response:
        return _json_response(200, {"value": [{"sha256": f.sha256, "size": f.size} for f in self.files.list()]})

    async def get_store_file(self, sha: str, headers: dict[str, str], **_: Any) -> Response:
        try:
            info = self.files.stat(sha)
            rng = parse_range_header(headers.get("range", ""), info.size) if headers.get("range") else None
            start, end = rng if rng else (0, info.size - 1)
            fh, start, length = self.files.open_range(sha, start, end if info.size else None)
        except FileStoreError as exc:
            if exc.code == "FileNotFound":
                raise not_found("file", sha) from None
            raise ApiError(416 if exc.code == "InvalidRange" else 400, exc.code, exc.message) from None
        with fh:
            data = fh.read(length)
        hdrs = [(b"content-type", b"application/octet-stream"), (b"accept-ranges", b"bytes")]
        if rng:
            hdrs.append((b"content-range", f"bytes {start}-{start + len(data) - 1}/{info.size}".encode()))
            return Response(206, data, hdrs)
        return Response(200, data, hdrs)
