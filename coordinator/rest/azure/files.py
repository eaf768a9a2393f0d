"""Azure routes for task files and node files (list, get, HEAD properties, delete).

Served by the agents through the seed's file machinery (descriptor-confined on the agent); names
are mapped between Azure's node layout and the TVM's (see `ids`).
"""

from __future__ import annotations

from typing import Any

from coordinator.common.errors import ApiError
from coordinator.common.timeutil import rfc3339
from coordinator.rest import paging
from coordinator.rest.dispatch import Dispatcher, Response
from coordinator.rest.routes_files import FileRoutes
from protocol import messages as pm

from .conv import http_date, query_get, std_headers
from .ids import node_path_in, node_path_out, resolve_job
from .router import AzureApi, base, listing

T = r"/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/files"
N = r"/pools/(?P<pool>[^/]+)/nodes/(?P<node>[^/]+)/files"


class FileApi:
    def __init__(self, app: Dispatcher) -> None:
        self.core = app.core
        self.seed = FileRoutes(app)  # the agent round trips, range reads and error mapping

    def register(self, r: AzureApi) -> None:
        r.route("GET", T, self.list_task_files)
        r.route("GET", T + "/(?P<path>.+)", self.get_task_file)
        r.route("HEAD", T + "/(?P<path>.+)", self.task_file_properties)
        r.route("DELETE", T + "/(?P<path>.+)", self.delete_task_file)
        r.route("GET", N, self.list_node_files)
        r.route("GET", N + "/(?P<path>.+)", self.get_node_file)
        r.route("HEAD", N + "/(?P<path>.+)", self.node_file_properties)
        r.route("DELETE", N + "/(?P<path>.+)", self.delete_node_file)

    def _task(self, job: str, task: str) -> tuple[str, str, str]:
        j = resolve_job(self.core, job)
        agent, root = self.seed._task_location(j.rec.workitem, j.rec.name, task)
        return agent, root, f"{base()}/jobs/{job}/tasks/{task}/files"

    def _node(self, pool: str, node: str) -> tuple[str, str]:
        t = self.core.get_tvm(pool, node)
        return t.rec.agent_id, f"{base()}/pools/{pool}/nodes/{node}/files"

    async def _list(
        self,
        agent: str,
        path: str,
        url: str,
        query: dict[str, str],
        headers: dict[str, str],
        rename: Any,
    ) -> Response:
        recursive = (query_get(query, "recursive") or "false").lower() == "true"
        paging.max_results(query)
        resp = await self.seed._ask(
            agent, pm.FileRequest(req_id=0, op="list", path=path, recursive=recursive)
        )

        def view(e: pm.FileEntry) -> dict[str, Any]:
            name = rename(e.name)
            out: dict[str, Any] = {
                "name": name,
                "url": f"{url}/{name}",
                "isDirectory": e.is_directory,
            }
            if not e.is_directory:
                out["properties"] = {
                    "lastModified": rfc3339(e.mtime),
                    "contentLength": str(e.size),
                    "contentType": "application/octet-stream",
                }
            return out

        return listing(
            resp.entries,
            query,
            headers,
            kind="files",
            entity="files",
            key=lambda e: e.name,
            view=view,
            view_key="name",
        )

    async def list_task_files(
        self, job: str, task: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        agent, root, url = self._task(job, task)
        return await self._list(agent, root, url, query, headers, lambda n: n)

    async def list_node_files(
        self, pool: str, node: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        agent, url = self._node(pool, node)
        return await self._list(agent, "", url, query, headers, node_path_out)

    def _props(
        self, st: pm.FileResponse, url: str, headers: dict[str, str]
    ) -> list[tuple[bytes, bytes]]:
        date = http_date(st.mtime).encode()
        return [
            *std_headers(headers),
            (b"content-type", b"application/octet-stream"),
            (b"ocp-content-length", str(st.size).encode()),
            (b"ocp-creation-time", date),
            (b"ocp-batch-file-isdirectory", b"false"),
            (b"ocp-batch-file-url", url.encode()),
            (b"ocp-batch-file-mode", b"0o100644"),
            (b"last-modified", date),
            (b"accept-ranges", b"bytes"),
        ]

    def _head(self, st: pm.FileResponse, url: str, headers: dict[str, str]) -> Response:
        props = self._props(st, url, headers)
        return Response(200, b"", [*props, (b"content-length", str(st.size).encode())])

    async def _get(self, agent: str, path: str, url: str, headers: dict[str, str]) -> Response:
        if "ocp-range" in headers:  # the Azure SDKs send the byte range as ocp-range
            headers = {**headers, "range": headers["ocp-range"]}
        resp = await self.seed._read(agent, path, headers)
        st = await self.seed._stat(agent, path)
        keep = [(k, v) for k, v in resp.headers if k == b"content-range"]
        # The service answers a byte range with 200 (the SDKs accept nothing else) and its range.
        return Response(200, resp.body, [*self._props(st, url, headers), *keep])

    async def get_task_file(
        self,
        job: str,
        task: str,
        path: str,
        headers: dict[str, str],
        query: dict[str, str],
        **_: Any,
    ) -> Response:
        agent, root, url = self._task(job, task)
        return await self._get(agent, f"{root}/{path}", f"{url}/{path}", headers)

    async def get_node_file(
        self, pool: str, node: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent, url = self._node(pool, node)
        return await self._get(agent, node_path_in(path), f"{url}/{path}", headers)

    async def task_file_properties(
        self, job: str, task: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent, root, url = self._task(job, task)
        st = await self.seed._stat(agent, f"{root}/{path}")
        return self._head(st, f"{url}/{path}", headers)

    async def node_file_properties(
        self, pool: str, node: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent, url = self._node(pool, node)
        st = await self.seed._stat(agent, node_path_in(path))
        return self._head(st, f"{url}/{path}", headers)

    async def _delete(self, agent: str, path: str, headers: dict[str, str]) -> Response:
        if ".." in path.split("/"):
            raise ApiError(400, "InvalidFilePath", "file paths may not contain '..'")
        try:
            await self.seed._ask(agent, pm.FileRequest(req_id=0, op="delete", path=path))
        except ApiError as exc:
            if exc.code == "FileIsDirectory":  # exists, but only files are deleted here
                raise ApiError(409, exc.code, exc.message) from None
            raise
        return Response(200, b"", std_headers(headers))

    async def delete_task_file(
        self, job: str, task: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent, root, _url = self._task(job, task)
        return await self._delete(agent, f"{root}/{path}", headers)

    async def delete_node_file(
        self, pool: str, node: str, path: str, headers: dict[str, str], **_: Any
    ) -> Response:
        agent, _url = self._node(pool, node)
        return await self._delete(agent, node_path_in(path), headers)
