"""Python client for the TVM Batch REST API: `Client` (sync) and `AsyncClient` (anyio: asyncio or trio).

Both share one set of resource groups (`client.pools`, `client.tvms`, `client.workitems`,
`client.jobs`, `client.tasks`, `client.files`); each method describes a `_Call`, and the client's
transport either performs it (sync) or returns an awaitable (async). Every service error raises
`BatchError` carrying the service's code.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx2
import msgspec

from coordinator.common import models as m
from coordinator.common.sharedkey import sign_request

_enc = msgspec.json.Encoder()


class BatchError(Exception):
    """An error answered by the service (or a transport failure, code `ConnectionFailed`)."""

    def __init__(self, status: int, code: str, message: str, values: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = values or {}


@dataclass
class _Call:
    method: str
    path: str
    body: Any = None
    params: dict[str, str] | None = None
    parse: Callable[[httpx2.Response], Any] | None = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None


@dataclass
class _Page:
    items: list[Any]
    next_link: str | None


def _list(typ: type) -> Callable[[httpx2.Response], Any]:
    """A list answer: one page and its odata.nextLink, which `_call` follows until the last page."""
    dec = msgspec.json.Decoder(dict[str, list[typ] | str | None])  # type: ignore[valid-type]

    def parse(r: httpx2.Response) -> _Page:
        body = dec.decode(r.content)
        link = body.get("odata.nextLink")
        return _Page(list(body.get("value") or []), link if isinstance(link, str) else None)

    return parse


def _next_call(call: _Call, link: str) -> _Call:
    """The same list call with the query of the server's nextLink (its $skiptoken among them). The path
    stays the client's own, so an endpoint behind a path prefix or a proxy keeps working."""
    params = dict(parse_qsl(urlsplit(link).query, keep_blank_values=True))
    return replace(call, params=params)


_T = TypeVar("_T")


def _one(typ: type[_T]) -> Callable[[httpx2.Response], _T]:
    dec = msgspec.json.Decoder(typ)
    return lambda r: dec.decode(r.content)


def _seg(name: str) -> str:
    return quote(name, safe="")


def _error_from(resp: httpx2.Response) -> BatchError:
    try:
        body = msgspec.json.decode(resp.content, type=m.ErrorBody)
        return BatchError(resp.status_code, body.code, body.message.value, {v.key: v.value for v in body.values})
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = resp.headers.get("x-tvm-error-code") or f"HTTP{resp.status_code}"
        return BatchError(resp.status_code, code, resp.text[:200] or code)


def _credentials(endpoint: str | None, account: str | None, key: str | None) -> tuple[str, str, str]:
    endpoint = endpoint or os.environ.get("TVM_ENDPOINT", "")
    account = account or os.environ.get("TVM_ACCOUNT", "")
    key = key or os.environ.get("TVM_KEY", "")
    missing = [n for n, v in (("TVM_ENDPOINT", endpoint), ("TVM_ACCOUNT", account), ("TVM_KEY", key)) if not v]
    if missing:
        raise BatchError(0, "MissingCredentials", "set " + ", ".join(missing) + " (tvm up prints them) or pass them")
    return endpoint.rstrip("/"), account, key


def _endpoint_path(endpoint: str) -> str:
    """The endpoint's path prefix; a clear BatchError (not a traceback) when it is not an http(s) URL."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as exc:
        raise BatchError(0, "InvalidEndpoint", f"endpoint {endpoint!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BatchError(0, "InvalidEndpoint", f"endpoint {endpoint!r} must look like http://HOST:PORT")
    return parts.path.rstrip("/")


class _Base:
    def __init__(self, endpoint: str | None, account: str | None, key: str | None, token: str | None) -> None:
        # A job manager's job-scoped credential (TVM_JOB_TOKEN) is used when no account key is given.
        if not token and not key and not os.environ.get("TVM_KEY"):
            token = os.environ.get("TVM_JOB_TOKEN") or None
        self.token = token
        self.endpoint, self.account, self.key = _credentials(endpoint, account, key) if not token else (
            (endpoint or os.environ.get("TVM_ENDPOINT", "")).rstrip("/"),
            account or os.environ.get("TVM_ACCOUNT", ""), key or "")
        if token and not self.endpoint:
            raise BatchError(0, "MissingCredentials", "set TVM_ENDPOINT or pass endpoint=")
        self._prefix = _endpoint_path(self.endpoint)
        self.pools = Pools(self)
        self.tvms = Tvms(self)
        self.workitems = Workitems(self)
        self.jobs = Jobs(self)
        self.tasks = Tasks(self)
        self.files = Files(self)
        self.ops = Ops(self)
        self.certificates = Certificates(self)  # issue 8: certificates, keys, agents, remote login
        self.account_keys = AccountKeys(self)
        self.agents = Agents(self)
        self.tvm_users = TvmUsers(self)

    def _prepare(self, call: _Call) -> tuple[str, str, dict[str, str], bytes | None]:
        content = call.raw if call.raw is not None else (_enc.encode(call.body) if call.body is not None else None)
        query = urlencode(call.params or {})
        headers = dict(call.headers or {})
        if content is not None:
            headers["Content-Type"] = "application/json; odata=minimalmetadata" if call.raw is None \
                else "application/octet-stream"
            headers["Content-Length"] = str(len(content))
        elif call.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        if self.token:
            headers["Authorization"] = f"TVMJobToken {self.token}"
        else:
            sign_request(call.method, self._prefix + call.path, query, headers, self.account, self.key)
        url = self.endpoint + call.path + (f"?{query}" if query else "")
        return call.method, url, headers, content

    def _finish(self, call: _Call, resp: httpx2.Response) -> Any:
        if resp.status_code >= 400:
            raise _error_from(resp)
        return call.parse(resp) if call.parse else None

    def _call(self, call: _Call) -> Any:
        raise NotImplementedError

    def _send(self, call: _Call) -> Any:
        raise NotImplementedError


class Client(_Base):
    """Synchronous client. Credentials default to TVM_ENDPOINT, TVM_ACCOUNT and TVM_KEY."""

    def __init__(self, endpoint: str | None = None, account: str | None = None, key: str | None = None,
                 *, timeout: float = 60.0, token: str | None = None, verify: Any = True) -> None:
        super().__init__(endpoint, account, key, token)
        self._http = httpx2.Client(timeout=timeout, verify=verify)  # verify: a CA file or SSLContext

    def _call(self, call: _Call) -> Any:
        result = self._send(call)
        if not isinstance(result, _Page):
            return result
        items = result.items
        while result.next_link:  # every page: a list of 100k tasks is all of them
            call = _next_call(call, result.next_link)
            result = self._send(call)
            items.extend(result.items)
        return items

    def _send(self, call: _Call) -> Any:
        method, url, headers, content = self._prepare(call)
        try:
            resp = self._http.request(method, url, headers=headers, content=content)
        except httpx2.HTTPError as exc:
            raise BatchError(0, "ConnectionFailed", f"cannot reach {self.endpoint}: {exc}") from None
        return self._finish(call, resp)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client (anyio: works under asyncio and trio). Methods return awaitables."""

    def __init__(self, endpoint: str | None = None, account: str | None = None, key: str | None = None,
                 *, timeout: float = 60.0, token: str | None = None, verify: Any = True) -> None:
        super().__init__(endpoint, account, key, token)
        self._http = httpx2.AsyncClient(timeout=timeout, verify=verify)  # verify: a CA file or SSLContext

    async def _call(self, call: _Call) -> Any:
        result = await self._send(call)
        if not isinstance(result, _Page):
            return result
        items = result.items
        while result.next_link:
            call = _next_call(call, result.next_link)
            result = await self._send(call)
            items.extend(result.items)
        return items

    async def _send(self, call: _Call) -> Any:
        method, url, headers, content = self._prepare(call)
        try:
            resp = await self._http.request(method, url, headers=headers, content=content)
        except httpx2.HTTPError as exc:
            raise BatchError(0, "ConnectionFailed", f"cannot reach {self.endpoint}: {exc}") from None
        return self._finish(call, resp)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Group:
    def __init__(self, client: _Base) -> None:
        self._c = client


class Pools(_Group):
    def add(self, name: str, *, vm_size: str = "small", target_dedicated: int = 0, max_tasks_per_vm: int = 1,
            tvm_fill_type: str = "spread", **extra: Any) -> Any:
        spec = m.PoolAdd(name=name, vm_size=vm_size, target_dedicated=target_dedicated,
                         max_tasks_per_vm=max_tasks_per_vm, tvm_fill_type=tvm_fill_type, **extra)
        return self._c._call(_Call("POST", "/pools", spec, parse=_one(m.Pool)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/pools", parse=_list(m.Pool)))

    def get(self, name: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(name)}", parse=_one(m.Pool)))

    def delete(self, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"/pools/{_seg(name)}"))

    def resize(self, name: str, target_dedicated: int, *, tvm_deallocation_option: str = "requeue",
               resize_timeout: str | None = None) -> Any:
        body = m.PoolResize(target_dedicated=target_dedicated, tvm_deallocation_option=tvm_deallocation_option,
                            resize_timeout=resize_timeout)
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/resize", body))

    def stop_resize(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/stopresize"))

    # builtins.list: in this class's body a bare `list` is the method `list` above.
    def remove_tvms(self, name: str, tvm_names: builtins.list[str], *, tvm_deallocation_option: str = "requeue",
                    resize_timeout: str | None = None) -> Any:
        body = m.TvmRemove(tvm_names=list(tvm_names), tvm_deallocation_option=tvm_deallocation_option,
                           resize_timeout=resize_timeout)
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/removetvms", body))

    def vm_sizes(self) -> Any:
        return self._c._call(_Call("GET", "/vmsizes", parse=_list(m.VmSize)))

    def enable_autoscale(self, name: str, formula: str | None = None, *,
                         evaluation_interval: str | None = None) -> Any:
        """Turn autoscale on (the formula is required then) or change its formula/interval."""
        body = m.PoolEnableAutoScale(auto_scale_formula=formula, auto_scale_evaluation_interval=evaluation_interval)
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/enableautoscale", body))

    def disable_autoscale(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/disableautoscale"))

    def evaluate_autoscale(self, name: str, formula: str) -> Any:
        """Run `formula` on the pool's data without applying it -> AutoScaleRun {timestamp, results, error}."""
        body = m.PoolEvaluateAutoScale(auto_scale_formula=formula)
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/evaluateautoscale", body, parse=_one(m.AutoScaleRun)))


class Tvms(_Group):
    def list(self, pool: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms", parse=_list(m.Tvm)))

    def get(self, pool: str, tvm: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}", parse=_one(m.Tvm)))

    def _op(self, pool: str, tvm: str, op: str, body: Any = None) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/{op}", body))

    def reboot(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(pool, tvm, "reboot", m.TvmReboot(tvm_reboot_option=option))

    def reimage(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(pool, tvm, "reimage", m.TvmReimage(tvm_reimage_option=option))

    def disable_scheduling(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(pool, tvm, "disablescheduling", m.TvmDisableScheduling(tvm_disable_scheduling_option=option))

    def enable_scheduling(self, pool: str, tvm: str) -> Any:
        return self._op(pool, tvm, "enablescheduling")

    def delete(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._c._call(_Call("DELETE", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}",
                                   params={"tvmDeallocationOption": option}))


class Workitems(_Group):
    def add(self, name: str, pool: str | None, *, priority: int = 0, auto_pool: dict | None = None,
            **extra: Any) -> Any:
        """`pool`: an existing pool's name, or None with `auto_pool` (an autoPoolSpecification object)."""
        env = m.JobExecutionEnvironment(pool_name=pool, auto_pool_specification=auto_pool)
        spec = m.WorkitemAdd(name=name, job_execution_environment=env, priority=priority, **extra)
        return self._c._call(_Call("POST", "/workitems", spec, parse=_one(m.Workitem)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/workitems", parse=_list(m.Workitem)))

    def get(self, name: str) -> Any:
        return self._c._call(_Call("GET", f"/workitems/{_seg(name)}", parse=_one(m.Workitem)))

    def delete(self, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"/workitems/{_seg(name)}"))

    def update(self, name: str, *, priority: int | None = None, schedule: m.Schedule | None = None,
               job_constraints: m.JobConstraints | None = None, on_all_tasks_complete: str | None = None) -> Any:
        body = m.WorkitemUpdate(priority=priority, schedule=schedule, job_constraints=job_constraints,
                                on_all_tasks_complete=on_all_tasks_complete)
        return self._c._call(_Call("PATCH", f"/workitems/{_seg(name)}", body, parse=_one(m.Workitem)))

    def terminate(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/terminate"))

    def disable(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/disable"))

    def enable(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/enable"))


class Jobs(_Group):
    def list(self, workitem: str) -> Any:
        return self._c._call(_Call("GET", f"/workitems/{_seg(workitem)}/jobs", parse=_list(m.Job)))

    def get(self, workitem: str, job: str) -> Any:
        return self._c._call(_Call("GET", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}", parse=_one(m.Job)))

    def update(self, workitem: str, job: str, *, priority: int | None = None,
               job_constraints: m.JobConstraints | None = None, on_all_tasks_complete: str | None = None) -> Any:
        body = m.JobUpdate(priority=priority, job_constraints=job_constraints,
                           on_all_tasks_complete=on_all_tasks_complete)
        return self._c._call(_Call("PATCH", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}", body,
                                   parse=_one(m.Job)))

    def terminate(self, workitem: str, job: str, *, reason: str | None = None) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/terminate",
                                   m.JobTerminate(terminate_reason=reason)))

    def disable(self, workitem: str, job: str, *, disable_tasks: str = "requeue") -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/disable",
                                   m.JobDisable(disable_tasks=disable_tasks)))

    def enable(self, workitem: str, job: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/enable"))

    def delete(self, workitem: str, job: str) -> Any:
        return self._c._call(_Call("DELETE", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}"))

    def task_counts(self, workitem: str, job: str) -> Any:
        dec = msgspec.json.Decoder(dict[str, m.TaskCounts])
        return self._c._call(_Call("GET", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/taskcounts",
                                   parse=lambda r: dec.decode(r.content)["taskCounts"]))


def task_spec(name: str, command_line: str, *, env: dict[str, str] | None = None,
              resource_files: Sequence[m.ResourceFile] = (), max_wall_clock_time: str | None = None,
              max_task_retry_count: int | None = None, retention_time: str | None = None,
              run_elevated: bool = False) -> m.TaskAdd:
    """Build a task for `tasks.add_collection` with keyword arguments."""
    constraints = None
    if max_wall_clock_time or max_task_retry_count is not None or retention_time:
        constraints = m.TaskConstraints(max_wall_clock_time=max_wall_clock_time,
                                        max_task_retry_count=max_task_retry_count, retention_time=retention_time)
    return m.TaskAdd(name=name, command_line=command_line,
                     environment_settings=[m.EnvironmentSetting(name=k, value=v) for k, v in (env or {}).items()],
                     resource_files=list(resource_files), task_constraints=constraints, run_elevated=run_elevated)


class Tasks(_Group):
    def _base(self, workitem: str, job: str) -> str:
        return f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}"

    def add(self, workitem: str, job: str, name: str, command_line: str, **kw: Any) -> Any:
        return self._c._call(_Call("POST", self._base(workitem, job) + "/tasks", task_spec(name, command_line, **kw)))

    def add_collection(self, workitem: str, job: str, tasks: Iterable[m.TaskAdd]) -> Any:
        """Add up to 100 tasks in one request; returns per-task results."""
        body = m.TaskAddCollection(value=list(tasks))
        return self._c._call(_Call("POST", self._base(workitem, job) + "/addtaskcollection", body,
                                   parse=lambda r: msgspec.json.decode(r.content, type=m.TaskAddCollectionResult).value))

    def list(self, workitem: str, job: str, *, state: str | None = None) -> Any:
        params = {"$filter": f"state eq '{state}'"} if state else None
        return self._c._call(_Call("GET", self._base(workitem, job) + "/tasks", params=params, parse=_list(m.Task)))

    def get(self, workitem: str, job: str, name: str) -> Any:
        return self._c._call(_Call("GET", f"{self._base(workitem, job)}/tasks/{_seg(name)}", parse=_one(m.Task)))

    def delete(self, workitem: str, job: str, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"{self._base(workitem, job)}/tasks/{_seg(name)}"))

    def terminate(self, workitem: str, job: str, name: str) -> Any:
        return self._c._call(_Call("POST", f"{self._base(workitem, job)}/tasks/{_seg(name)}/terminate"))

    def update(self, workitem: str, job: str, name: str, *, max_wall_clock_time: str | None = None,
               max_task_retry_count: int | None = None, retention_time: str | None = None) -> Any:
        body = m.TaskUpdate(task_constraints=m.TaskConstraints(
            max_wall_clock_time=max_wall_clock_time, max_task_retry_count=max_task_retry_count,
            retention_time=retention_time))
        return self._c._call(_Call("PATCH", f"{self._base(workitem, job)}/tasks/{_seg(name)}", body))


    def wait(self, workitem: str, job: str, **kw: Any) -> Any:
        """Until every task of the job completed (see `wait_for_tasks`)."""
        if isinstance(self._c, AsyncClient):
            return wait_for_tasks_async(self._c, workitem, job, **kw)
        return wait_for_tasks(self._c, workitem, job, **kw)  # type: ignore[arg-type]

    def add_many(self, workitem: str, job: str, tasks: Sequence[m.TaskAdd]) -> Any:
        """Any number of tasks, chunked into collections of 100."""
        if isinstance(self._c, AsyncClient):
            return add_many_async(self._c, workitem, job, tasks)
        return add_many(self._c, workitem, job, tasks)  # type: ignore[arg-type]


class Ops(_Group):
    """Operations: the cluster summary (`tvm status`) and the Prometheus metrics text."""

    def status(self) -> Any:
        return self._c._call(_Call("GET", "/ops/status", parse=lambda r: msgspec.json.decode(r.content)))

    def metrics(self) -> Any:
        return self._c._call(_Call("GET", "/metrics", parse=lambda r: r.text))


class Files(_Group):
    def list_from_task(self, workitem: str, job: str, task: str, *, recursive: bool = False) -> Any:
        path = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files"
        return self._c._call(_Call("GET", path, params={"recursive": str(recursive).lower()},
                                   parse=_list(m.NodeFile)))

    def get_from_task(self, workitem: str, job: str, task: str, path: str,
                      *, byte_range: tuple[int, int] | None = None) -> Any:
        url = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files/{quote(path)}"
        return self._c._call(_Call("GET", url, headers=_range(byte_range), parse=lambda r: r.content))

    def list_from_tvm(self, pool: str, tvm: str, *, recursive: bool = False) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files",
                                   params={"recursive": str(recursive).lower()}, parse=_list(m.NodeFile)))

    def get_from_tvm(self, pool: str, tvm: str, path: str, *, byte_range: tuple[int, int] | None = None) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files/{quote(path)}",
                                   headers=_range(byte_range), parse=lambda r: r.content))

    def properties_from_task(self, workitem: str, job: str, task: str, path: str) -> Any:
        """{"size": int, "lastModified": RFC 3339 str} of a task's file (a HEAD request)."""
        url = f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/tasks/{_seg(task)}/files/{quote(path)}"
        return self._c._call(_Call("HEAD", url, parse=_file_props))

    def properties_from_tvm(self, pool: str, tvm: str, path: str) -> Any:
        return self._c._call(_Call("HEAD", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/files/{quote(path)}",
                                   parse=_file_props))

    def upload(self, data: bytes, *, sha256: str | None = None) -> Any:
        """Put bytes in the coordinator's file store; returns {sha256, size, blobSource}."""
        return self._c._call(_Call("POST", "/files", raw=data, params={"sha256": sha256} if sha256 else None,
                                   parse=lambda r: msgspec.json.decode(r.content)))


def _file_props(resp: httpx2.Response) -> dict[str, Any]:
    return {"size": int(resp.headers["ocp-content-length"]), "lastModified": resp.headers["last-modified"]}


def _range(byte_range: tuple[int, int] | None) -> dict[str, str] | None:
    return {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else None


# --------------------------------------------------------------------------- conveniences


def chunks(items: Sequence[m.TaskAdd], size: int = 100) -> Iterable[list[m.TaskAdd]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def add_many(client: Client, workitem: str, job: str, tasks: Sequence[m.TaskAdd]) -> list[m.TaskAddResult]:
    """Add any number of tasks, 100 per request."""
    out: list[m.TaskAddResult] = []
    for part in chunks(tasks):
        out.extend(client.tasks.add_collection(workitem, job, part))
    return out


async def add_many_async(client: AsyncClient, workitem: str, job: str,
                         tasks: Sequence[m.TaskAdd]) -> list[m.TaskAddResult]:
    out: list[m.TaskAddResult] = []
    for part in chunks(tasks):
        out.extend(await client.tasks.add_collection(workitem, job, part))
    return out


def wait_for_tasks(client: Client, workitem: str, job: str, *, timeout: float | None = None,
                   poll: float = 0.25, progress: Callable[[m.TaskCounts], None] | None = None) -> m.TaskCounts:
    """Block until every task of the job is completed; `progress` gets the counts on each poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        counts = client.jobs.task_counts(workitem, job)
        if progress:
            progress(counts)
        if counts.active == 0 and counts.running == 0:
            return counts
        if deadline is not None and time.monotonic() > deadline:
            raise BatchError(0, "WaitTimedOut", f"tasks still unfinished after {timeout} s: "
                             f"{counts.active} active, {counts.running} running")
        time.sleep(poll)


async def wait_for_tasks_async(client: AsyncClient, workitem: str, job: str, *, timeout: float | None = None,  # noqa: ASYNC109 (mirrors the sync API)
                               poll: float = 0.25,
                               progress: Callable[[m.TaskCounts], None] | None = None) -> m.TaskCounts:
    import anyio

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        counts = await client.jobs.task_counts(workitem, job)
        if progress:
            progress(counts)
        if counts.active == 0 and counts.running == 0:
            return counts
        if deadline is not None and time.monotonic() > deadline:
            raise BatchError(0, "WaitTimedOut", f"tasks still unfinished after {timeout} s")
        await anyio.sleep(poll)


# --------------------------------------------------------------------------- issue 8


class Certificates(_Group):
    def add(self, thumbprint: str, data_b64: str, *, certificate_format: str = "pfx", password: str | None = None,
            thumbprint_algorithm: str = "sha1") -> Any:
        req = m.CertificateAdd(thumbprint=thumbprint, thumbprint_algorithm=thumbprint_algorithm, data=data_b64,
                               certificate_format=certificate_format, password=password)
        return self._c._call(_Call("POST", "/certificates", req, parse=_one(m.Certificate)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/certificates", parse=_list(m.Certificate)))

    def get(self, thumbprint: str, thumbprint_algorithm: str = "sha1") -> Any:
        return self._c._call(_Call("GET", f"/certificates/{_seg(thumbprint_algorithm)}-{_seg(thumbprint)}",
                                   parse=_one(m.Certificate)))

    def delete(self, thumbprint: str, thumbprint_algorithm: str = "sha1") -> Any:
        return self._c._call(_Call("DELETE", f"/certificates/{_seg(thumbprint_algorithm)}-{_seg(thumbprint)}"))


class AccountKeys(_Group):
    def regenerate(self, key_name: str) -> Any:
        """key_name "primary" or "secondary"; returns both keys (the other one is unchanged)."""
        return self._c._call(_Call("POST", "/account/regeneratekeys", m.RegenerateKey(key_name=key_name),
                                   parse=_one(m.AccountKeys)))


class Agents(_Group):
    def revoke(self, agent_id: str) -> Any:
        return self._c._call(_Call("POST", f"/agents/{_seg(agent_id)}/revoke"))

    def create_token(self, *, expires_in: str | None = None, single_use: bool = False) -> Any:
        """A join token for agents that expires (ISO 8601 duration) and/or enrols one agent only;
        the answer's `token` is the only time the secret is shown."""
        return self._c._call(_Call("POST", "/agenttokens", m.AgentTokenAdd(expires_in=expires_in, single_use=single_use),
                                   parse=_one(m.AgentToken)))

    def list_tokens(self) -> Any:
        return self._c._call(_Call("GET", "/agenttokens", parse=_list(m.AgentToken)))

    def revoke_token(self, token_id: str) -> Any:
        return self._c._call(_Call("DELETE", f"/agenttokens/{_seg(token_id)}"))


class TvmUsers(_Group):
    def add(self, pool: str, tvm: str, name: str, ssh_public_key: str, *, expiry_time: str | None = None,
            is_admin: bool = False) -> Any:
        req = m.TvmUserAdd(name=name, ssh_public_key=ssh_public_key, expiry_time=expiry_time, is_admin=is_admin)
        return self._c._call(_Call("POST", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users", req,
                                   parse=_one(m.TvmUser)))

    def list(self, pool: str, tvm: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users", parse=_list(m.TvmUser)))

    def delete(self, pool: str, tvm: str, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users/{_seg(name)}"))

    def remote_login_settings(self, pool: str, tvm: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/remoteloginsettings",
                                   parse=_one(m.RemoteLoginSettings)))
