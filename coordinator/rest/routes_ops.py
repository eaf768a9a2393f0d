"""Operations routes: `GET /metrics` (Prometheus text, no SharedKey: see coordinator/runtime/metrics.py for
why that is safe) and `GET /ops/status` (cluster summary with per-TVM agent health; needs the key)."""

from __future__ import annotations

from typing import Any

from coordinator.runtime.metrics import render_prometheus, status_json

from .dispatch import Response, RouteAdder, RouteGroup, _json_response

PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class OpsRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("GET", r"/metrics", self.get_metrics)
        r("GET", r"/ops/status", self.get_status)

    async def get_metrics(self, **_: Any) -> Response:
        mon = self.svc.monitor
        text = render_prometheus(
            self.core,
            mon.latency,
            mon.rate,
            self.core.clock(),
            http_requests=self.app.requests,
            started_at=mon.started_at,
            agent_link_events=self.svc.agent_link_events,
            agent_frames=self.svc.agent_frames(),
            journal_commits=(self.svc.journal.commits, self.svc.journal.rows),
        )
        return Response(
            200,
            text.encode(),
            [(b"content-type", PROMETHEUS_TEXT), (b"cache-control", b"no-store")],
        )

    async def get_status(self, **_: Any) -> Response:
        return _json_response(200, status_json(self.svc, self.svc.monitor))
