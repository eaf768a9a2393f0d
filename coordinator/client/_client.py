"""Python client for the TVM Batch REST API: `Client` (sync) and `AsyncClient` (anyio: asyncio or trio).

Both share one set of resource groups (`client.pools`, `client.tvms`, `client.workitems`,
`client.jobs`, `client.tasks`, `client.files`); each method describes a `_Call`, and the client's
transport either performs it (sync) or returns an awaitable (async). Every service error raises
`BatchError` carrying the service's code.
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx2

from coordinator.common.sharedkey import sign_request

from . import _lean
from ._failover import FailoverPolicy
from ._http import (
    BatchError,
    _Call,
    _credentials,
    _enc,
    _endpoint_path,
    _error_from,
    _next_call,
    _Page,
)
from ._resources import (
    AccountKeys,
    Agents,
    Certificates,
    Jobs,
    Ops,
    Pools,
    Tvms,
    TvmUsers,
    Workitems,
)
from ._tasks import Files, Tasks


class _Base:
    is_async = False  # AsyncClient's calls return awaitables

    def __init__(
        self, endpoint: str | None, account: str | None, key: str | None, token: str | None
    ) -> None:
        # A job manager's job-scoped credential (TVM_JOB_TOKEN) is used when no account key is given.
        if not token and not key and not os.environ.get("TVM_KEY"):
            token = os.environ.get("TVM_JOB_TOKEN") or None
        self.token = token
        self.endpoint, self.account, self.key = (
            _credentials(endpoint, account, key)
            if not token
            else (
                (endpoint or os.environ.get("TVM_ENDPOINT", "")).rstrip("/"),
                account or os.environ.get("TVM_ACCOUNT", ""),
                key or "",
            )
        )
        if token and not self.endpoint:
            raise BatchError(0, "MissingCredentials", "set TVM_ENDPOINT or pass endpoint=")
        # URL1,URL2: coordinators sharing one store, one active; the others answer 503
        # CoordinatorStandby. Requests go to the one that last answered.
        self.endpoints = [e.strip().rstrip("/") for e in self.endpoint.split(",") if e.strip()]
        self.endpoint = self.endpoints[0] if self.endpoints else self.endpoint
        prefixes = {_endpoint_path(e) for e in self.endpoints or [self.endpoint]}
        if len(prefixes) > 1:
            raise BatchError(0, "InvalidEndpoint", "every endpoint must have the same path")
        self._prefix = prefixes.pop()
        self.failover = FailoverPolicy(len(self.endpoints))
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
        content = (
            call.raw
            if call.raw is not None
            else (_enc.encode(call.body) if call.body is not None else None)
        )
        query = urlencode(call.params or {})
        headers = dict(call.headers or {})
        if content is not None:
            headers["Content-Type"] = (
                "application/json; odata=minimalmetadata"
                if call.raw is None
                else "application/octet-stream"
            )
            headers["Content-Length"] = str(len(content))
        elif call.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        if self.token:
            headers["Authorization"] = f"TVMJobToken {self.token}"
        else:
            sign_request(
                call.method, self._prefix + call.path, query, headers, self.account, self.key
            )
        url = self.endpoint + call.path + (f"?{query}" if query else "")
        return call.method, url, headers, content

    def _unreachable(self, exc: Exception) -> str:
        if len(self.endpoints) > 1:
            return f"cannot reach any of {', '.join(self.endpoints)} (last: {exc})"
        return f"cannot reach {self.endpoint}: {exc}"

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

    def __init__(
        self,
        endpoint: str | None = None,
        account: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        token: str | None = None,
        verify: Any = True,
    ) -> None:
        super().__init__(endpoint, account, key, token)
        self._http = httpx2.Client(
            timeout=timeout, verify=verify
        )  # verify: a CA file or SSLContext

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
        attempt = self.failover.start()
        while True:
            method, url, headers, content = self._prepare(call)
            try:
                resp = self._http.request(method, url, headers=headers, content=content)
            except httpx2.HTTPError as exc:
                wait = attempt.after_error(self, method, exc)
                if wait is None:
                    raise BatchError(0, "ConnectionFailed", self._unreachable(exc)) from None
                time.sleep(wait)
                continue
            wait = attempt.after_response(self, resp)
            if wait is None:
                return self._finish(call, resp)
            time.sleep(wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client (anyio: works under asyncio and trio). Methods return awaitables."""

    is_async = True

    def __init__(
        self,
        endpoint: str | None = None,
        account: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        token: str | None = None,
        verify: Any = True,
    ) -> None:
        super().__init__(endpoint, account, key, token)
        self._http = httpx2.AsyncClient(
            timeout=timeout, verify=verify
        )  # verify: a CA file or SSLContext
        # plain http without a proxy: a lean HTTP/1.1 path (see _lean.py), else httpx
        self._lean = _lean.LeanHttp(timeout) if _lean.usable(self.endpoints) else None

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
        attempt = self.failover.start()
        while True:
            method, url, headers, content = self._prepare(call)
            try:
                resp: Any
                if self._lean is not None:
                    resp = await self._lean.request(method, url, headers, content)
                else:
                    resp = await self._http.request(method, url, headers=headers, content=content)
            except httpx2.HTTPError as exc:
                wait = attempt.after_error(self, method, exc)
                if wait is None:
                    raise BatchError(0, "ConnectionFailed", self._unreachable(exc)) from None
                await anyio.sleep(wait)
                continue
            wait = attempt.after_response(self, resp)
            if wait is None:
                return self._finish(call, resp)
            await anyio.sleep(wait)

    async def aclose(self) -> None:
        if self._lean is not None:
            await self._lean.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
