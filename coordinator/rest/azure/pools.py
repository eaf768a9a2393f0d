"""Azure routes for pools, node counts and supported images."""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.common.timeutil import rfc3339
from coordinator.core.records import PoolRec
from coordinator.rest.dispatch import Dispatcher, Response

from . import inputs
from .body import Body, parse_json
from .conv import (
    check_conditions,
    created,
    empty,
    invalid,
    json_response,
    metadata_url,
    resource_headers,
)
from .router import AzureApi, base, listing, select_one
from .sizes import local_vm_size, supported_images
from .views import pool_modified, pool_view

P = r"/pools/(?P<pool>[^/]+)"
# Changeable by PATCH only while the pool has no nodes (2025-06-01).
_PATCH_WHEN_EMPTY = (
    "vmSize",
    "taskSlotsPerNode",
    "enableInterNodeCommunication",
    "virtualMachineConfiguration",
    "taskSchedulingPolicy",
)
_STATES = (
    "creating",
    "idle",
    "offline",
    "preempted",
    "rebooting",
    "reimaging",
    "running",
    "starting",
    "startTaskFailed",
    "leavingPool",
    "unknown",
    "unusable",
    "waitingForStartTask",
    "deallocated",
    "deallocating",
    "upgradingOS",
)


class PoolApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", "/pools", self.list_pools)
        r.route("POST", "/pools", self.add_pool)
        r.route("GET", P, self.get_pool)
        r.route("HEAD", P, self.pool_exists)
        r.route("PATCH", P, self.patch_pool)
        r.route("DELETE", P, self.delete_pool)
        r.route("POST", P + "/updateproperties", self.update_properties)
        r.route("POST", P + "/resize", self.resize)
        r.route("POST", P + "/stopresize", self.stop_resize)
        r.route("POST", P + "/removenodes", self.remove_nodes)
        r.route("POST", P + "/enableautoscale", self.enable_autoscale)
        r.route("POST", P + "/disableautoscale", self.disable_autoscale)
        r.route("POST", P + "/evaluateautoscale", self.evaluate_autoscale)
        r.route("GET", "/nodecounts", self.node_counts)
        r.route("GET", "/supportedimages", self.list_images)

    def _view(self, pool: PoolRec) -> dict[str, Any]:
        return pool_view(self.core, base(), pool)

    def _pool(self, name: str, headers: dict[str, str], *, read: bool) -> PoolRec:
        pool = self.core.get_pool(name)
        check_conditions(headers, self._view(pool)["eTag"], pool_modified(pool), read=read)
        return pool

    async def list_pools(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        return listing(
            list(self.core.pools.values()),
            query,
            headers,
            kind="pools",
            entity="pools",
            key=lambda p: p.spec.name,
            view=self._view,
        )

    async def add_pool(self, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        b = parse_json(body)
        req = inputs.pool_add(b, self.core.vm_sizes())
        b.log_unknown("pool add")
        await self.svc.execute(self.core.add_pool, req)
        pool = self.core.pools[req.name]
        view = self._view(pool)
        return created(headers, view["url"], view["eTag"], pool_modified(pool))

    async def get_pool(
        self, pool: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._pool(pool, headers, read=True)
        view = self._view(rec)
        out = {"odata.metadata": metadata_url(base(), "pools/@Element"), **select_one(view, query)}
        return json_response(
            200, out, headers, extra=resource_headers(view["eTag"], pool_modified(rec))
        )

    async def pool_exists(self, pool: str, headers: dict[str, str], **_: Any) -> Response:
        rec = self._pool(pool, headers, read=True)
        return empty(200, headers, resource_headers(self._view(rec)["eTag"], pool_modified(rec)))

    async def _update(
        self, pool: str, spec: m.PoolAdd, headers: dict[str, str], status: int
    ) -> Response:
        await self.svc.execute(self.core.update_pool, pool, spec)
        rec = self.core.get_pool(pool)
        view = self._view(rec)
        extra = [
            (b"dataserviceid", view["url"].encode()),
            *resource_headers(view["eTag"], pool_modified(rec)),
        ]
        return empty(status, headers, extra)

    async def patch_pool(
        self, pool: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._pool(pool, headers, read=False)
        b = parse_json(body)
        b.refuse(("networkConfiguration", "userAccounts", "mountConfiguration"), inputs.WHY_LOCAL)
        if b.objs("applicationPackageReferences"):
            raise invalid(
                "applicationPackageReferences", "", "application packages are not supported"
            )
        spec = rec.spec
        changes: dict[str, Any] = self._when_empty(rec, b)
        if b.has("startTask"):
            changes["start_task"] = inputs.start_task(b.obj("startTask"))
        if b.has("metadata"):
            changes["metadata"] = inputs.metadata(b.objs("metadata"))
        if b.has("certificateReferences"):
            changes["certificate_references"] = inputs.cert_refs(b.objs("certificateReferences"))
        if b.has("displayName"):
            az = changes.get("azure", spec.azure) or {}
            changes["azure"] = {**az, "displayName": b.text("displayName")}
        b.accept("targetNodeCommunicationMode", "resourceTags", "upgradePolicy")
        b.log_unknown("pool patch")
        return await self._update(pool, msgspec.structs.replace(spec, **changes), headers, 200)

    def _when_empty(self, rec: PoolRec, b: Body) -> dict[str, Any]:
        """vmSize, taskSlotsPerNode, ...: only while the pool has no nodes (else 409 naming it)."""
        given = [k for k in _PATCH_WHEN_EMPTY if b.has(k)]
        if not given:
            return {}
        if rec.target or self.core.pool_tvms(rec.spec.name):
            raise ApiError(
                409,
                "PoolHasNodes",
                f"{given[0]} can be changed only while the pool has no nodes; resize it to 0 first",
                field=given[0],
            )
        spec = rec.spec
        az = dict(spec.azure or {})
        changes: dict[str, Any] = {}
        if b.has("virtualMachineConfiguration"):
            az["virtualMachineConfiguration"] = inputs.vm_configuration(b)
        catalogue = self.core.vm_sizes()
        local = spec.vm_size
        if b.has("vmSize"):
            name = b.req_text("vmSize")
            local = local_vm_size(name, catalogue)
            az["vmSize"] = name.lower()
            changes["vm_size"] = local
        if b.has("taskSlotsPerNode") or b.has("vmSize"):
            slots = b.integer("taskSlotsPerNode", spec.max_tasks_per_vm)
            limit = 4 * int(catalogue[local][0])
            if slots is None or not 1 <= slots <= limit:
                raise invalid(
                    "taskSlotsPerNode", slots, f"taskSlotsPerNode must be between 1 and {limit}"
                )
            changes["max_tasks_per_vm"] = slots
        policy = b.obj("taskSchedulingPolicy")
        if policy is not None:
            policy.accept("jobDefaultOrder")
            changes["tvm_fill_type"] = (policy.text("nodeFillType") or "spread").lower()
        if b.has("enableInterNodeCommunication"):
            changes["communication"] = b.flag("enableInterNodeCommunication")
        changes["azure"] = az
        return changes

    async def update_properties(
        self, pool: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._pool(pool, headers, read=False)
        b = parse_json(body)
        for key in ("metadata", "applicationPackageReferences"):
            if b.raw(key) is None:
                raise invalid(key, None, f"{key} is required (it may be empty)")
        if b.objs("applicationPackageReferences"):
            raise invalid(
                "applicationPackageReferences", "", "application packages are not supported"
            )
        spec = msgspec.structs.replace(
            rec.spec,
            start_task=inputs.start_task(b.obj("startTask")),
            metadata=inputs.metadata(b.objs("metadata")),
            certificate_references=inputs.cert_refs(b.objs("certificateReferences")),
        )
        b.accept("targetNodeCommunicationMode")
        b.log_unknown("pool updateproperties")
        return await self._update(pool, spec, headers, 204)

    async def delete_pool(self, pool: str, headers: dict[str, str], **_: Any) -> Response:
        self._pool(pool, headers, read=False)
        await self.svc.execute(self.core.delete_pool, pool)
        return empty(202, headers)

    async def resize(self, pool: str, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        rec = self._pool(pool, headers, read=False)
        b = parse_json(body)
        target = b.integer("targetDedicatedNodes", 0) or 0
        low = b.integer("targetLowPriorityNodes", 0) or 0
        if low < 0:
            raise invalid(
                "targetLowPriorityNodes", low, "targetLowPriorityNodes must not be negative"
            )
        req = m.PoolResize(
            target_dedicated=target,
            resize_timeout=b.text("resizeTimeout"),
            tvm_deallocation_option=b.text("nodeDeallocationOption") or "requeue",
        )
        b.log_unknown("pool resize")
        await self.svc.execute(self.core.resize_pool, pool, req)
        az = rec.spec.azure or {}
        if int(az.get("targetLowPriorityNodes", 0) or 0) != low:
            spec = msgspec.structs.replace(rec.spec, azure={**az, "targetLowPriorityNodes": low})
            await self.svc.execute(self.core.update_pool, pool, spec)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/pools/{pool}".encode())])

    async def stop_resize(self, pool: str, headers: dict[str, str], **_: Any) -> Response:
        self._pool(pool, headers, read=False)
        await self.svc.execute(self.core.stop_resize, pool)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/pools/{pool}".encode())])

    async def remove_nodes(
        self, pool: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        self._pool(pool, headers, read=False)
        b = parse_json(body)
        nodes = b.texts("nodeList")
        if not nodes:
            raise invalid("nodeList", "", "nodeList must name at least one node")
        req = m.TvmRemove(
            tvm_names=nodes,
            tvm_deallocation_option=b.text("nodeDeallocationOption") or "requeue",
            resize_timeout=b.text("resizeTimeout"),
        )
        b.log_unknown("pool removenodes")
        await self.svc.execute(self.core.remove_tvms, pool, req)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/pools/{pool}".encode())])

    async def enable_autoscale(
        self, pool: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        self._pool(pool, headers, read=False)
        b = parse_json(body, required=False)
        formula = b.text("autoScaleFormula")
        interval = b.text("autoScaleEvaluationInterval")
        b.log_unknown("pool enableautoscale")
        await self.svc.execute(self.core.enable_autoscale, pool, formula, interval)
        return empty(200, headers, [(b"dataserviceid", f"{base()}/pools/{pool}".encode())])

    async def disable_autoscale(self, pool: str, headers: dict[str, str], **_: Any) -> Response:
        await self.svc.execute(self.core.disable_autoscale, pool)
        return empty(200, headers, [(b"dataserviceid", f"{base()}/pools/{pool}".encode())])

    async def evaluate_autoscale(
        self, pool: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        b = parse_json(body)
        formula = b.req_text("autoScaleFormula")
        b.log_unknown("pool evaluateautoscale")
        ts, results, code, message = self.core.evaluate_autoscale(pool, formula)  # read-only
        run: dict[str, Any] = {
            "odata.metadata": metadata_url(
                base(), "Microsoft.Azure.Batch.Protocol.Entities.AutoScaleRun"
            ),
            "timestamp": rfc3339(ts),
            "results": results,
        }
        if code:
            run["error"] = {"code": code, "message": message or "", "values": []}
        return json_response(200, run, headers)

    async def node_counts(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        def counts(pool: PoolRec) -> dict[str, Any]:
            tally = dict.fromkeys(_STATES, 0)
            by_lower = {s.lower(): s for s in _STATES}
            total = 0
            for t in self.core.pool_tvms(pool.spec.name):
                key = by_lower.get(t.rec.state.lower(), "unknown")
                tally[key] += 1
                total += 1
            return {
                "poolId": pool.spec.name,
                "dedicated": {**tally, "total": total},
                "lowPriority": {**dict.fromkeys(_STATES, 0), "total": 0},
            }

        return listing(
            list(self.core.pools.values()),
            query,
            headers,
            kind="nodecounts",
            entity="poolnodecounts",
            key=lambda p: p.spec.name,
            view=counts,
            view_key="poolId",
        )

    async def list_images(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        images = supported_images()
        return listing(
            images,
            query,
            headers,
            kind="supportedimages",
            entity="supportedimages",
            key=lambda i: str(i["nodeAgentSKUId"]) + "|" + str(i["imageReference"]),
            view=lambda i: i,
            view_key="nodeAgentSKUId",
        )
