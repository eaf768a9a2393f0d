"""REST routes for pools and TVMs."""

from __future__ import annotations

from typing import Any

from . import models as m
from ._api_base import ApiBase, Response, _decode, _json_response
from .views import pool_view, tvm_view

MAX_FILE_CHUNK = 4 * 1024 * 1024


class PoolRoutes(ApiBase):
    def _register_pools(self) -> None:
        r = self._route
        r("GET", r"/pools", self.list_pools)
        r("POST", r"/pools", self.add_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)", self.get_pool)
        r("DELETE", r"/pools/(?P<pool>[^/]+)", self.delete_pool)
        r("POST", r"/pools/(?P<pool>[^/]+)/resize", self.resize_pool)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms", self.list_tvms)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)", self.get_tvm)

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
