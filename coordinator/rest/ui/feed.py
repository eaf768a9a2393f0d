"""The dashboard's live feed: server-sent events of coalesced snapshots.

Cost is bounded by time, not by events: each view (overview, one pool, one job, one task,
throughput) is computed at most once per `interval` seconds, shared by every browser watching it,
and only while someone watches. Nothing here runs per placement or per completion, so a
dashboard left open costs one pass over the tasks per interval however fast tasks flow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from coordinator.core.records import Job

from . import data

DEFAULT_INTERVAL = 1.0
MAX_VIEWS = 256  # views are keyed by names from the URL: keep the cache bounded
MAX_STREAM_SECONDS = 600.0  # EventSource reconnects by itself; a stuck stream cannot live forever
KEEPALIVE_SECONDS = 15.0
# A view is rebuilt no sooner than DUTY_FACTOR times what it last took to build: on a huge job the
# feed slows down (a 40 ms snapshot waits 4 s) instead of taking more than ~1% of the event loop.
DUTY_FACTOR = 100.0
_json = msgspec.json.Encoder()


class Feed:
    def __init__(
        self,
        core: CoordinatorState,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.interval = interval
        self.clock = clock
        self.throughput = data.Throughput(min_gap=interval / 2)
        self.pools: dict[str, data.PoolHistory] = {}
        self._cache: dict[str, tuple[float, bytes, float]] = {}  # view -> (built at, JSON, cost)
        # job -> (counted at, counts): the overview, throughput and job views share one walk
        self._counts: dict[int, tuple[float, dict[str, int], Job]] = {}
        self.computed = 0  # how many snapshots were built (tests and benchmarks read it)
        self.busy = 0.0  # seconds spent building them (the feed's whole cost on the event loop)

    def count(self, job: Job) -> dict[str, int]:
        now = self.clock()
        hit = self._counts.get(id(job))
        if hit is not None and hit[2] is job and now - hit[0] < self.interval:
            return hit[1]
        c = data.counts(job)
        self._counts[id(job)] = (now, c, job)
        return c

    def _compute(self, view: str) -> Any:
        now = self.clock()
        if len(self._counts) > 2 * len(self.core.jobs) + MAX_VIEWS:  # deleted jobs' entries
            self._counts.clear()
        kind, _, arg = view.partition(":")
        parts = arg.split("/") if arg else []
        if kind not in ("overview", "throughput"):
            # Rates keep being sampled whichever page is open, so the plots have no holes.
            data.throughput(self.core, self.throughput, now, self.count)
        if kind == "overview" and not arg:
            return data.overview(self.core, self.throughput, now, self.count)
        if kind == "throughput" and not arg:
            return data.throughput(self.core, self.throughput, now, self.count)
        if kind == "pool" and len(parts) == 1:
            if parts[0] not in self.core.pools:
                self.pools.pop(parts[0], None)
            hist = self.pools.setdefault(parts[0], data.PoolHistory())
            if len(self.pools) > MAX_VIEWS:
                self.pools.pop(next(iter(self.pools)))
            return data.pool(self.core, parts[0], hist, now)
        if kind == "job" and len(parts) == 2:
            return data.job(self.core, parts[0], parts[1], self.count)
        if kind == "task" and len(parts) == 3:
            return data.task(self.core, *parts)
        raise data.not_found(view)

    def snapshot(self, view: str) -> bytes:
        """The view's JSON, rebuilt only when the cached one is older than the interval."""
        now = self.clock()
        hit = self._cache.get(view)
        if hit is not None and now - hit[0] < max(self.interval, hit[2] * DUTY_FACTOR):
            return hit[1]
        t0 = time.perf_counter()
        try:
            body = _json.encode(self._compute(view))
        except ApiError as exc:
            body = _json.encode({"error": {"code": exc.code, "message": exc.message}})
        cost = time.perf_counter() - t0
        self.busy += cost
        self.computed += 1
        self._cache[view] = (now, body, cost)
        if len(self._cache) > MAX_VIEWS:
            oldest = min(self._cache, key=lambda k: self._cache[k][0])
            del self._cache[oldest]
        return body

    async def stream(
        self, view: str, receive: Callable, send: Callable, alive: Callable[[], bool]
    ) -> None:
        """Send the view whenever it changed, checked once per interval, until the browser goes
        or its session ends (`alive()` false: logged out or expired)."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            last = b""
            quiet_since = started = trio.current_time()
            while trio.current_time() - started < MAX_STREAM_SECONDS and alive():
                body = self.snapshot(view)
                now = trio.current_time()
                if body != last:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + body + b"\n\n",
                            "more_body": True,
                        }
                    )
                    last, quiet_since = body, now
                elif now - quiet_since > KEEPALIVE_SECONDS:
                    await send(
                        {"type": "http.response.body", "body": b": ka\n\n", "more_body": True}
                    )
                    quiet_since = now
                await trio.sleep(self.interval)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()
