"""Azure routes for compute nodes (TVMs): list, get, reboot, reimage, scheduling, remote login."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.rest.dispatch import Dispatcher, Response

from .body import parse_json
from .conv import empty, json_response, metadata_url
from .router import AzureApi, base, listing, select_one
from .views import node_view

N = r"/pools/(?P<pool>[^/]+)/nodes/(?P<node>[^/]+)"


class NodeApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", r"/pools/(?P<pool>[^/]+)/nodes", self.list_nodes)
        r.route("GET", N, self.get_node)
        r.route("POST", N + "/reboot", self.reboot)
        r.route("POST", N + "/reimage", self.reimage)
        r.route("POST", N + "/disablescheduling", self.disable_scheduling)
        r.route("POST", N + "/enablescheduling", self.enable_scheduling)
        r.route("GET", N + "/remoteloginsettings", self.remote_login)

    async def list_nodes(
        self, pool: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        self.core.get_pool(pool)
        return listing(
            self.core.pool_tvms(pool),
            query,
            headers,
            kind="nodes",
            entity="nodes",
            key=lambda t: t.rec.name,
            view=lambda t: node_view(self.core, base(), t),
        )

    async def get_node(
        self, pool: str, node: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        view = node_view(self.core, base(), self.core.get_tvm(pool, node))
        out = {"odata.metadata": metadata_url(base(), "nodes/@Element"), **select_one(view, query)}
        return json_response(200, out, headers)

    def _option(self, body: bytes, key: str) -> str:
        b = parse_json(body, required=False)
        option = b.text(key) or "requeue"
        b.log_unknown(key)
        return option

    async def reboot(
        self, pool: str, node: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        req = m.TvmReboot(tvm_reboot_option=self._option(body, "nodeRebootOption"))
        await self.svc.execute(self.core.reboot_tvm, pool, node, req)
        return empty(202, headers)

    async def reimage(
        self, pool: str, node: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        req = m.TvmReimage(tvm_reimage_option=self._option(body, "nodeReimageOption"))
        await self.svc.execute(self.core.reimage_tvm, pool, node, req)
        return empty(202, headers)

    async def disable_scheduling(
        self, pool: str, node: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        option = self._option(body, "nodeDisableSchedulingOption")
        req = m.TvmDisableScheduling(tvm_disable_scheduling_option=option)
        await self.svc.execute(self.core.disable_scheduling, pool, node, req)
        return empty(200, headers)

    async def enable_scheduling(
        self, pool: str, node: str, headers: dict[str, str], **_: Any
    ) -> Response:
        await self.svc.execute(self.core.enable_scheduling, pool, node)
        return empty(200, headers)

    async def remote_login(
        self, pool: str, node: str, headers: dict[str, str], **_: Any
    ) -> Response:
        t = self.core.get_tvm(pool, node)
        body = {
            "odata.metadata": metadata_url(
                base(), "Microsoft.Azure.Batch.Protocol.Entities.ComputeNodeRemoteLoginSettings"
            ),
            "remoteLoginIPAddress": t.rec.ip,
            "remoteLoginPort": 22,
        }
        return json_response(200, body, headers)
