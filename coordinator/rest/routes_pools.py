"""REST routes for pools and TVMs."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m

from . import paging
from .dispatch import Response, RouteAdder, RouteGroup, _decode, _json_response
from .views import pool_view, tvm_view

MAX_FILE_CHUNK = 4 * 1024 * 1024


class PoolRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("GET", r"/pools", self.list_pools)
        r("POST", r"/pools", self.add_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)", self.get_pool)
        r("DELETE", r"/pools/(?P<pool>[^/]+)", self.delete_pool)
        r("POST", r"/pools/(?P<pool>[^/]+)/resize", self.resize_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms", self.list_tvms)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)", self.get_tvm)
        r("POST", r"/pools/(?P<pool>[^/]+)/stopresize", self.stop_resize)
        r("POST", r"/pools/(?P<pool>[^/]+)/removetvms", self.remove_tvms)
        r("DELETE", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)", self.delete_tvm)
        r("POST", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/reboot", self.reboot_tvm)
        r("POST", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/reimage", self.reimage_tvm)
        r(
            "POST",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/disablescheduling",
            self.disable_scheduling,
        )
        r(
            "POST",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/enablescheduling",
            self.enable_scheduling,
        )
        r("GET", r"/vmsizes", self.list_vm_sizes)

    # ------------------------------------------------------------------ pools

    async def list_pools(self, query: dict[str, str], **_: Any) -> Response:
        return _json_response(
            200,
            paging.listing(
                list(self.core.pools.values()),
                query,
                lambda p: p.spec.name,
                lambda p: pool_view(self.core, p),
            ),
        )

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

    async def list_tvms(self, pool: str, query: dict[str, str], **_: Any) -> Response:
        return _json_response(
            200,
            paging.listing(
                list(self.core.pool_tvms(pool)),
                query,
                lambda t: t.rec.name,
                lambda t: tvm_view(self.core, t),
            ),
        )

    async def get_tvm(self, pool: str, tvm: str, **_: Any) -> Response:
        return _json_response(200, tvm_view(self.core, self.core.get_tvm(pool, tvm)))

    # ------------------------------------------------------------------ resize and TVM operations

    async def stop_resize(self, pool: str, **_: Any) -> Response:
        await self.svc.execute(self.core.stop_resize, pool)
        return Response(202)

    async def remove_tvms(self, pool: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TvmRemove)
        await self.svc.execute(self.core.remove_tvms, pool, req)
        return Response(202)

    async def delete_tvm(
        self, pool: str, tvm: str, query: dict[str, str] | None = None, **_: Any
    ) -> Response:
        option = (query or {}).get("tvmDeallocationOption", "requeue")
        await self.svc.execute(self.core.delete_tvm, pool, tvm, option)
        return Response(202)

    async def reboot_tvm(self, pool: str, tvm: str, body: bytes = b"", **_: Any) -> Response:
        req = _decode(body, m.TvmReboot) if body.strip() else m.TvmReboot()
        await self.svc.execute(self.core.reboot_tvm, pool, tvm, req)
        return Response(202)

    async def reimage_tvm(self, pool: str, tvm: str, body: bytes = b"", **_: Any) -> Response:
        req = _decode(body, m.TvmReimage) if body.strip() else m.TvmReimage()
        await self.svc.execute(self.core.reimage_tvm, pool, tvm, req)
        return Response(202)

    async def disable_scheduling(
        self, pool: str, tvm: str, body: bytes = b"", **_: Any
    ) -> Response:
        req = _decode(body, m.TvmDisableScheduling) if body.strip() else m.TvmDisableScheduling()
        await self.svc.execute(self.core.disable_scheduling, pool, tvm, req)
        return Response(200)

    async def enable_scheduling(self, pool: str, tvm: str, **_: Any) -> Response:
        await self.svc.execute(self.core.enable_scheduling, pool, tvm)
        return Response(200)

    async def list_vm_sizes(self, query: dict[str, str], **_: Any) -> Response:
        sizes = [
            m.VmSize(
                name=k,
                cores=v[0],
                memory_mib=v[1],
                disk_gib=v[2],
                max_tasks_per_vm=4 * v[0],
                source=v[3],
            )
            for k, v in self.core.vm_sizes().items()
        ]
        return _json_response(200, paging.listing(sizes, query, lambda s: s.name, lambda s: s))
