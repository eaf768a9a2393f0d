"""REST routes for pool autoscale: enable, disable, evaluate (reference §5.8)."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m

from .dispatch import Response, RouteAdder, RouteGroup, _decode, _json_response
from .views import autoscale_run_view


class AutoscaleRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("POST", r"/pools/(?P<pool>[^/]+)/enableautoscale", self.enable_autoscale)
        r("POST", r"/pools/(?P<pool>[^/]+)/disableautoscale", self.disable_autoscale)
        r("POST", r"/pools/(?P<pool>[^/]+)/evaluateautoscale", self.evaluate_autoscale)

    async def enable_autoscale(self, pool: str, body: bytes, **_: Any) -> Response:
        req = _decode(body or b"{}", m.PoolEnableAutoScale)
        await self.svc.execute(
            self.core.enable_autoscale,
            pool,
            req.auto_scale_formula,
            req.auto_scale_evaluation_interval,
        )
        return Response(200)

    async def disable_autoscale(self, pool: str, **_: Any) -> Response:
        await self.svc.execute(self.core.disable_autoscale, pool)
        return Response(200)

    async def evaluate_autoscale(self, pool: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.PoolEvaluateAutoScale)
        run = self.core.evaluate_autoscale(pool, req.auto_scale_formula)  # read-only: no journal
        return _json_response(200, autoscale_run_view(run))
