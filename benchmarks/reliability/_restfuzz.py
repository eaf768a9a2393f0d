"""REST fuzzing: every route of the seed API and of the Azure API (its api-version), driven through
the coordinator's own ASGI application in this process (a real CoordinatorService with its SQLite
journal, on a Trio loop in a thread), with signed requests so that inputs get past authentication
to the body, query and path parsing behind it.

A finding is any answer of 500 or more, any error answer without a JSON `{code, message}` body,
or an exception out of the application."""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from typing import Any
from urllib.parse import quote, unquote, urlencode

import msgspec
import trio

from coordinator.common import models as m
from coordinator.common.sharedkey import sign_request

AZURE_VERSIONS = ("2024-02-01.19.0", "2025-06-01")
NAMES = ("p", "wi", "job-0000000001", "t", "aj", "ap", "nope", "tvm-0", "a" * 70, "", ".", "..")
IMAGE = {
    "imageReference": {"publisher": "canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
    "nodeAgentSKUId": "batch.node.ubuntu 24.04",
}
# Valid bodies (checked at start) that the fuzzer mutates, so inputs reach the deeper checks.
SEED_TEMPLATES: dict[str, dict[str, Any]] = {
    "pool": {"name": "p", "vmSize": "small", "targetDedicated": 0, "maxTasksPerVM": 2},
    "workitem": {
        "name": "wi",
        "jobExecutionEnvironment": {"poolName": "p"},
        "priority": 1,
        "jobConstraints": {"maxWallClockTime": "PT1H"},
    },
    "task": {
        "name": "t",
        "commandLine": "/bin/true",
        "environmentSettings": [{"name": "A", "value": "b"}],
        "taskConstraints": {"maxWallClockTime": "PT5M", "retentionTime": "PT1H"},
    },
    "collection": {"value": [{"name": "c1", "commandLine": "/bin/true"}]},
    "resize": {"targetDedicated": 1},
    "autoscale": {"autoScaleFormula": "$TargetDedicated = 0;"},
}
AZURE_TEMPLATES: dict[str, dict[str, Any]] = {
    "pool": {
        "id": "ap",
        "vmSize": "Standard_D2s_v3",
        "virtualMachineConfiguration": IMAGE,
        "targetDedicatedNodes": 0,
    },
    "job": {"id": "aj", "poolInfo": {"poolId": "p"}, "priority": 1},
    "task": {
        "id": "t",
        "commandLine": "/bin/true",
        "constraints": {"maxWallClockTime": "PT5M", "retentionTime": "PT1H"},
    },
    "collection": {"value": [{"id": "c1", "commandLine": "/bin/true"}]},
    "resize": {"targetDedicatedNodes": 1},
    "patch": {"priority": 5, "metadata": [{"name": "a", "value": "b"}]},
    "autoscale": {"autoScaleFormula": "$TargetDedicatedNodes = 0;"},
}
QUERY_KEYS = (
    "$filter",
    "$select",
    "$expand",
    "maxresults",
    "timeout",
    "$skiptoken",
    "recursive",
    "sha256",
    "state",
    "api-version",
)
HEADER_KEYS = (
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "client-request-id",
    "return-client-request-id",
    "range",
    "ocp-range",
    "content-type",
)


def field_names() -> list[str]:
    """Every wire name of the REST models: what fuzzed objects are made of."""
    names: set[str] = set()
    for obj in vars(m).values():
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct):
            names.update(
                msgspec.structs.fields(obj)[i].encode_name
                for i in range(len(msgspec.structs.fields(obj)))
            )
    for tpl in (*SEED_TEMPLATES.values(), *AZURE_TEMPLATES.values()):
        names.update(tpl)
    return sorted(names)


def route_table(app: Any) -> list[tuple[str, str, bool]]:
    """(method, pattern, azure) for every route."""
    routes = [(meth, pat.pattern, False) for meth, pat, _ in app._routes]
    routes += [(meth, pat.pattern, True) for meth, pat, _ in app.azure._routes]
    return routes


_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>(?P<body>[^)]*)\)")


def fill_path(pattern: str, values: dict[str, str]) -> str:
    """A raw (percent-encoded) path for `pattern`, its groups replaced by `values`."""

    def sub(mt: re.Match[str]) -> str:
        name = mt["name"]
        if name == "verb":
            return quote(values.get(name, "terminate"), safe="")
        if name == "path":
            return "/".join(quote(p, safe="") for p in values.get(name, "x").split("/"))
        return quote(values.get(name, "x"), safe="")

    return _GROUP.sub(sub, pattern).rstrip("$")


class AppThread:
    """A CoordinatorService and its ASGI app on a Trio loop in a thread; `request` is blocking."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._token: Any = None
        self._stop: trio.Event | None = None
        self.failure: BaseException | None = None

    def __enter__(self) -> AppThread:
        self._thread.start()
        if not self._ready.wait(30) or self.failure is not None:
            raise RuntimeError(f"the coordinator did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        self.svc.close()

    async def _main(self) -> None:
        from coordinator.rest.app import make_app
        from coordinator.runtime.filestore import FileStore
        from coordinator.runtime.service import CoordinatorService

        try:
            self.svc = CoordinatorService(os.path.join(self.base, "state"), heartbeat_timeout=5.0)
            self.app = make_app(self.svc, FileStore(os.path.join(self.base, "state", "files")))
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
        except BaseException as exc:
            self.failure = exc
            self._ready.set()
            raise
        async with trio.open_nursery() as nursery:
            await nursery.start(self.svc.run)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def request(
        self,
        method: str,
        raw_path: str,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = dict(headers or {})
        if body:
            hdrs.setdefault("content-type", "application/json")
        hdrs["content-length"] = str(len(body))
        sign_request(method, raw_path, query, hdrs, self.svc.account, self.svc.keys[0])
        return trio.from_thread.run(
            self._call, method, raw_path, query, hdrs, body, trio_token=self._token
        )

    async def _call(
        self, method: str, raw_path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1", "replace"),
            "headers": [
                (k.lower().encode("latin-1"), v.encode("utf-8", "replace"))
                for k, v in headers.items()
            ]
            + [(b"host", b"fuzz.local")],
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await trio.sleep_forever()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        out: dict[str, Any] = {"status": 0, "headers": {}, "body": b""}

        async def send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                out["status"] = msg["status"]
                out["headers"] = {k.decode(): v.decode("latin-1") for k, v in msg["headers"]}
            elif msg["type"] == "http.response.body":
                out["body"] += msg.get("body", b"")

        with trio.fail_after(30):
            await self.app(scope, receive, send)
        return out["status"], out["headers"], out["body"]


def check_answer(method: str, status: int, headers: dict[str, str], body: bytes) -> str:
    """What is wrong with an answer ("" if nothing): a 5xx, or a refusal that does not say why."""
    if status >= 500 or status < 100:
        return f"status {status}: {body[:300]!r}"
    if status >= 400 and method != "HEAD" and status != 304:
        try:
            doc = json.loads(body)
        except ValueError:
            return f"{status} without a JSON error body: {body[:200]!r}"
        if not isinstance(doc, dict) or not doc.get("code") or not doc.get("message"):
            return f"{status} without code and message: {body[:200]!r}"
    if status >= 400 and not (headers.get("x-tvm-error-code") or headers.get("x-ms-error-code")):
        return f"{status} without an error-code header"
    return ""


class Tally:
    def __init__(self) -> None:
        self.inputs = 0
        self.statuses: Counter[int] = Counter()
        self.findings: list[str] = []

    def record(self, what: str, status: int, problem: str) -> None:
        self.inputs += 1
        self.statuses[status] += 1
        if problem and len(self.findings) < 50:
            self.findings.append(f"{what}: {problem}")


def seed_state(app: AppThread) -> None:
    """Resources the fuzzed paths name, created through valid requests (which must succeed)."""
    av = "api-version=" + AZURE_VERSIONS[-1]
    for method, path, query, body in (
        ("POST", "/pools", "", SEED_TEMPLATES["pool"]),
        ("POST", "/workitems", "", SEED_TEMPLATES["workitem"]),
        ("POST", "/workitems/wi/jobs/job-0000000001/tasks", "", SEED_TEMPLATES["task"]),
        ("POST", "/pools", av, AZURE_TEMPLATES["pool"]),
        ("POST", "/jobs", av, AZURE_TEMPLATES["job"]),
        ("POST", "/jobs/aj/tasks", av, AZURE_TEMPLATES["task"]),
    ):
        status, _, text = app.request(method, path, query, body=json.dumps(body).encode())
        if status >= 300:
            raise AssertionError(f"seeding {method} {path} {query}: {status} {text[:300]!r}")


__all__ = [
    "AZURE_VERSIONS",
    "AppThread",
    "HEADER_KEYS",
    "NAMES",
    "QUERY_KEYS",
    "Tally",
    "check_answer",
    "field_names",
    "fill_path",
    "route_table",
    "seed_state",
    "urlencode",
]
