"""Azure account-level catalogues and the operations that do not apply to a TVM.

Served: `/poolusagemetrics` (core hours per pool and half hour, from TVM time: `core/usage.py`),
`/applications` (always empty: application packages are not supported) and
`GET /applications/{id}` (404 `ApplicationNotFound`). `/supportedimages` and `/nodecounts` are the
pool routes'.

Answered with an error (never a bare 404), as the README's conformance table lists:
- node `start` / `deallocate`: 409 `OperationInvalidForCurrentState` (a TVM is a process on a host
  that is always allocated while it is in its pool; it is never deallocated);
- `uploadbatchservicelogs`, VM extensions, and the Windows-only remote desktop (`/rdp`): 409
  `InvalidRestAPIForAccountSetting` (the account, a TVM Batch service, does not offer them).
"""

from __future__ import annotations

from typing import Any

from coordinator.common.errors import ApiError
from coordinator.common.timeutil import parse_time, rfc3339
from coordinator.core import usage
from coordinator.rest.dispatch import Dispatcher, Handler, Response

from .conv import query_get
from .router import AzureApi, listing
from .sizes import azure_vm_size

N = r"/pools/(?P<pool>[^/]+)/nodes/(?P<node>[^/]+)"
_NOT_OFFERED = "InvalidRestAPIForAccountSetting"
_NOT_DEALLOCATED = (
    "node {node} is a TVM: a process on its host that stays allocated while it is in its pool; it "
    "is never deallocated, so it cannot be deallocated or started (remove it with removenodes, or "
    "stop scheduling on it with disablescheduling)"
)
_NO_SERVICE_LOGS = (
    "uploadbatchservicelogs is not offered by this account: the agent's logs are on its host "
    "(journalctl -u tvm-agent, or the tvm up log); task output is in the node's files"
)
_NO_EXTENSIONS = (
    "VM extensions are not offered by this account: a TVM is not an Azure VM; use a pool start "
    "task to install software"
)
_NO_RDP = (
    "remote desktop (RDP) is for Windows nodes; TVMs are Linux: add a node user and use ssh with "
    "the node's remoteloginsettings"
)
# (method, path below the node, error code, why) of the node operations that do not apply to a TVM.
_NODE_REFUSALS = [
    ("POST", "/start", "OperationInvalidForCurrentState", _NOT_DEALLOCATED),
    ("POST", "/deallocate", "OperationInvalidForCurrentState", _NOT_DEALLOCATED),
    ("POST", "/uploadbatchservicelogs", _NOT_OFFERED, _NO_SERVICE_LOGS),
    ("GET", "/extensions", _NOT_OFFERED, _NO_EXTENSIONS),
    ("GET", "/extensions/(?P<ext>[^/]+)", _NOT_OFFERED, _NO_EXTENSIONS),
    ("GET", "/rdp", _NOT_OFFERED, _NO_RDP),
]


class CatalogApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", "/poolusagemetrics", self.usage_metrics)
        r.route("GET", "/applications", self.list_applications)
        r.route("GET", "/applications/(?P<app>[^/]+)", self.get_application)
        for method, path, code, why in _NODE_REFUSALS:
            r.route(method, N + path, self._refusal(code, why))

    # ------------------------------------------------------------------ catalogues

    def _time(self, query: dict[str, str], name: str) -> float | None:
        text = query_get(query, name)
        if text is None:
            return None
        try:
            return parse_time(text, name)
        except ApiError:
            raise ApiError(
                400,
                "InvalidQueryParameterValue",
                f"{name} is not an ISO 8601 time: {text!r}",
                QueryParameterName=name,
                QueryParameterValue=text,
            ) from None

    async def usage_metrics(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        now = self.core.store.clock()
        start = self._time(query, "starttime")
        end = self._time(query, "endtime")
        if start is None and end is None:
            # Azure's default: only the last complete aggregation interval.
            end = (now // usage.INTERVAL_S) * usage.INTERVAL_S
            start = end - usage.INTERVAL_S
        start = 0.0 if start is None else start
        end = now if end is None else end
        if end < start:
            raise ApiError(
                400,
                "InvalidQueryParameterValue",
                "endtime is before starttime",
                QueryParameterName="endtime",
                QueryParameterValue=query_get(query, "endtime") or "",
            )
        sizes = self.core.vm_sizes()
        # An endtime after now asks for the interval in progress too, counted up to now.
        rows = usage.metrics(self.core.store, now, start, end, partial=end > now)

        def vm_size(row: usage.UsageRow) -> str:
            # The size as the pool was created with (its Azure name), as the pool shows it.
            pool = self.core.pools.get(row.pool)
            given = (pool.spec.azure or {}).get("vmSize") if pool is not None else None
            return str(given or azure_vm_size(row.vm_size, sizes))

        def view(row: usage.UsageRow) -> dict[str, Any]:
            return {
                "poolId": row.pool,
                "startTime": rfc3339(row.start),
                "endTime": rfc3339(row.start + usage.INTERVAL_S),
                "vmSize": vm_size(row),
                "totalCoreHours": row.core_hours,
            }

        return listing(
            rows,
            query,
            headers,
            kind="poolusagemetrics",
            entity="poolusagemetrics",
            key=lambda r: f"{int(r.start):012d}|{r.pool}",
            view=view,
            view_key="startTime",
        )

    async def list_applications(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        empty: list[dict[str, Any]] = []
        return listing(
            empty, query, headers, kind="applications", entity="applications",
            key=lambda a: str(a["id"]), view=lambda a: a,
        )  # fmt: skip

    async def get_application(self, app: str, **_: Any) -> Response:
        raise ApiError(
            404,
            "ApplicationNotFound",
            f"the application {app!r} does not exist: this account has no application packages",
        )

    # ------------------------------------------------------------------ not applicable

    def _refusal(self, code: str, why: str) -> Handler:
        """A node operation that does not apply to a TVM: 404 for a node that does not exist,
        else 409 with `code` and why (`{node}` in it names the node)."""

        async def refuse(pool: str, node: str, **_: Any) -> Response:
            self.core.get_tvm(pool, node)
            raise ApiError(409, code, why.format(node=repr(node)))

        return refuse
