"""REST routes for task/TVM files and the file store."""

from __future__ import annotations

import contextlib
import errno
from typing import Any

import trio

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request, not_found, unavailable
from coordinator.common.timeutil import rfc3339
from coordinator.runtime.filestore import FileStoreError, parse_range_header
from protocol import messages as pm

from . import paging
from .dispatch import Response, RouteAdder, RouteGroup, _json_response
from .limits import BodyStream

MAX_FILE_CHUNK = 4 * 1024 * 1024
# The agent's file error codes (tvmagent/files.py) and their HTTP status; any other code is a 404.
_FILE_ERROR_STATUS = {
    "TaskFilesCleanedUp": 410,
    "InvalidRange": 416,
    "InvalidFilePath": 400,
    # Outside the served areas, a symbolic link, a FIFO/socket/device: exists, but is never served.
    "FilePathForbidden": 403,
    "SymbolicLinkNotFollowed": 403,
    "NotARegularFile": 403,
}


class FileRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files", self.list_tvm_files)
        r(
            "GET",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files/(?P<path>.+)",
            self.get_tvm_file,
        )
        r(
            "HEAD",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/files/(?P<path>.+)",
            self.tvm_file_properties,
        )
        r(
            "GET",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files",
            self.list_task_files,
        )
        r(
            "GET",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files/(?P<path>.+)",
            self.get_task_file,
        )
        r(
            "HEAD",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files/(?P<path>.+)",
            self.task_file_properties,
        )
        r("POST", r"/files", self.upload_file)
        r("GET", r"/files", self.list_store_files)
        r("GET", r"/files/sha256/(?P<sha>[^/]+)", self.get_store_file)
        r("HEAD", r"/files/sha256/(?P<sha>[^/]+)", self.get_store_file)

    # ------------------------------------------------------------------ files on TVMs

    def _task_location(self, wi: str, job: str, task: str) -> tuple[str, str]:
        j, t = self.core.get_task(wi, job, task)
        if not t.tvm:
            raise ApiError(
                409, "TaskNotStarted", f"task {task!r} has not run on a TVM yet; it has no files"
            )
        tvm = self.core.tvms.get(t.tvm)
        if tvm is None:
            raise ApiError(
                404, "TVMNotFound", f"TVM {t.tvm!r} that ran task {task!r} is no longer in the pool"
            )
        return tvm.rec.agent_id, f"tasks/{wi}/{job}/{task}"

    async def _ask(self, agent_id: str, req: pm.FileRequest) -> pm.FileResponse:
        resp = await self.svc.ask_agent_files(agent_id, req)
        if resp is None:
            raise ApiError(503, "TVMUnreachable", "the TVM holding these files is not connected")
        if resp.error_code:
            raise ApiError(
                _FILE_ERROR_STATUS.get(resp.error_code, 404), resp.error_code, resp.message
            )
        return resp

    async def list_task_files(
        self, wi: str, job: str, task: str, query: dict[str, str], **_: Any
    ) -> Response:
        agent_id, base = self._task_location(wi, job, task)
        return await self._list(agent_id, base, query)

    async def list_tvm_files(
        self, pool: str, tvm: str, query: dict[str, str], **_: Any
    ) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return await self._list(t.rec.agent_id, "", query)

    async def _list(self, agent_id: str, base: str, query: dict[str, str]) -> Response:
        recursive = query.get("recursive", "false").lower() == "true"
        paging.max_results(query)  # a bad maxresults is a 400 before the agent is asked
        resp = await self._ask(
            agent_id, pm.FileRequest(req_id=0, op="list", path=base, recursive=recursive)
        )
        return _json_response(
            200,
            paging.listing(
                resp.entries,
                query,
                lambda e: e.name,
                lambda e: m.NodeFile(
                    name=e.name,
                    is_directory=e.is_directory,
                    properties=None
                    if e.is_directory
                    else m.FileProperties(
                        content_length=e.size, last_modified=rfc3339(e.mtime) or ""
                    ),
                ),
            ),
        )

    async def get_task_file(
        self, wi: str, job: str, task: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent_id, base = self._task_location(wi, job, task)
        return await self._read(agent_id, f"{base}/{path}", headers)

    async def get_tvm_file(
        self, pool: str, tvm: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return await self._read(t.rec.agent_id, path, headers)

    # File properties are a HEAD on the file's URL (as in Azure Batch): no body, the size in
    # `ocp-content-length`, the modification time in `last-modified` (RFC 3339).
    async def task_file_properties(
        self, wi: str, job: str, task: str, path: str, **_: Any
    ) -> Response:
        agent_id, base = self._task_location(wi, job, task)
        return self._props_response(await self._stat(agent_id, f"{base}/{path}"))

    async def tvm_file_properties(self, pool: str, tvm: str, path: str, **_: Any) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return self._props_response(await self._stat(t.rec.agent_id, path))

    def _props_response(self, st: pm.FileResponse) -> Response:
        return Response(
            200,
            b"",
            [
                (b"content-type", b"application/octet-stream"),
                (b"ocp-content-length", str(st.size).encode()),
                (b"last-modified", (rfc3339(st.mtime) or "").encode()),
                (b"accept-ranges", b"bytes"),
            ],
        )

    async def _stat(self, agent_id: str, path: str) -> pm.FileResponse:
        if ".." in path.split("/"):
            raise bad_request("InvalidFilePath", "file paths may not contain '..'")
        return await self._ask(agent_id, pm.FileRequest(req_id=0, op="stat", path=path))

    async def _read(self, agent_id: str, path: str, headers: dict[str, str]) -> Response:
        st = await self._stat(agent_id, path)
        try:
            rng = (
                parse_range_header(headers.get("range", ""), st.size)
                if headers.get("range")
                else None
            )
        except FileStoreError as exc:
            raise ApiError(416, exc.code, exc.message) from None
        start, end = rng if rng else (0, st.size - 1)
        length = max(0, end - start + 1)
        if length > MAX_FILE_CHUNK and rng is None:
            length = MAX_FILE_CHUNK  # large files: clients page with Range (the CLI does)
        data = b""
        if length:
            resp = await self._ask(
                agent_id,
                pm.FileRequest(
                    req_id=0, op="read", path=path, offset=start, length=min(length, MAX_FILE_CHUNK)
                ),
            )
            data = resp.data
        hdrs = [
            (b"content-type", b"application/octet-stream"),
            (b"ocp-content-length", str(st.size).encode()),
            (b"last-modified", (rfc3339(st.mtime) or "").encode()),
            (b"accept-ranges", b"bytes"),
        ]
        if rng:
            hdrs.append(
                (b"content-range", f"bytes {start}-{start + len(data) - 1}/{st.size}".encode())
            )
            return Response(206, data, hdrs)
        return Response(200, data, hdrs)

    # ------------------------------------------------------------------ file store

    async def upload_file(
        self, stream: BodyStream, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        """Streamed to a temporary file under the store, hashed on the way (never held in memory);
        over the size limit, a wrong Content-MD5 or sha256, or a client gone: 4xx and nothing kept."""
        expected = query.get("sha256") or headers.get("x-tvm-sha256") or None
        try:
            # Closed here when put() stops early (a full disk): not left to the garbage collector.
            async with contextlib.aclosing(stream.chunks()) as chunks:
                stored = await self.files.put(chunks, expected_sha256=expected)
        except FileStoreError as exc:
            raise bad_request(exc.code, exc.message) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
            # Nothing was kept (put() removes its partial file): the client may retry later.
            raise unavailable(
                "StoreUnavailable",
                f"the coordinator's file store could not write the upload ({exc.strerror});"
                " nothing was stored. Retry once it has room again.",
                retry_after=2,
                reason=exc.strerror or "",
            ) from None
        return _json_response(
            201,
            {
                "sha256": stored.sha256,
                "size": stored.size,
                "blobSource": f"filestore:sha256:{stored.sha256}",
            },
        )

    async def list_store_files(self, query: dict[str, str], **_: Any) -> Response:
        paging.max_results(query)
        files = await trio.to_thread.run_sync(
            self.files.list
        )  # a directory walk: off the event loop
        return _json_response(
            200,
            paging.listing(
                files, query, lambda f: f.sha256, lambda f: {"sha256": f.sha256, "size": f.size}
            ),
        )

    async def get_store_file(self, sha: str, headers: dict[str, str], **_: Any) -> Response:
        try:
            await self.files.ensure_local(sha)
            info = self.files.stat(sha)
            rng = (
                parse_range_header(headers.get("range", ""), info.size)
                if headers.get("range")
                else None
            )
            start, end = rng if rng else (0, info.size - 1)
            fh, start, length = self.files.open_range(sha, start, end if info.size else None)
        except FileStoreError as exc:
            if exc.code == "FileNotFound":
                raise not_found("file", sha) from None
            status = {"InvalidRange": 416, "FileDamaged": 500}.get(exc.code, 400)
            raise ApiError(status, exc.code, exc.message) from None
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            raise unavailable(
                "StoreUnavailable",
                f"the file could not be read from the shared store ({exc.strerror}). Retry later.",
                retry_after=2,
                reason=exc.strerror or "",
            ) from None
        with fh:
            data = fh.read(length)
        hdrs = [(b"content-type", b"application/octet-stream"), (b"accept-ranges", b"bytes")]
        if rng:
            hdrs.append(
                (b"content-range", f"bytes {start}-{start + len(data) - 1}/{info.size}".encode())
            )
            return Response(206, data, hdrs)
        return Response(200, data, hdrs)
