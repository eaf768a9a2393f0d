"""Bounded per-pool metric history for the autoscale sample methods (pure: no clock, no I/O).

The coordinator records one sample per series every sample period (reference §5.7: 30 s). Task
counts come from the core's own task table; resource metrics come from the latest heartbeat of
each TVM, aggregated over the pool (mean for CPU, memory and disk; total for the traffic and disk
counters). Samples become visible to formulas only after a delay (about a minute in the real
service), which is applied when reading, so the history itself stays simple and append-only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from coordinator.autoscale import SERIES_NAMES, Sample

DEFAULT_MAX_SAMPLES = 2880  # 24 h of 30-s samples per series: formulas rarely look back further


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass
class TvmCounters:
    """The last heartbeat values of one TVM, plus what was already counted of its byte counters."""

    cpu_percent: float = 0.0
    memory_bytes: float = 0.0
    disk_bytes: float = 0.0
    net_rx: int = 0  # cumulative, as the agent reads /proc/net/dev
    net_tx: int = 0
    counted_rx: int | None = None  # counter value at the previous sample (None: not sampled yet)
    counted_tx: int | None = None
    fresh: bool = False  # a heartbeat arrived since the previous sample


@dataclass
class MetricsHistory:
    """pool -> series name -> samples (oldest first), at most ``max_samples`` each."""

    max_samples: int = DEFAULT_MAX_SAMPLES
    _pools: dict[str, dict[str, deque[Sample]]] = field(default_factory=dict)
    last_sample: dict[str, float] = field(default_factory=dict)  # pool -> time of its last sample

    def record(self, pool: str, ts: float, values: Mapping[str, float]) -> None:
        """Append one sample per series in ``values`` (names from SERIES_NAMES) taken at ``ts``."""
        series = self._pools.setdefault(pool, {})
        when = to_datetime(ts)
        for name, value in values.items():
            if name not in SERIES_NAMES:
                raise ValueError(f"unknown series {name!r}")
            q = series.get(name)
            if q is None:
                q = series[name] = deque(maxlen=self.max_samples)
            q.append(Sample(when, float(value)))
        self.last_sample[pool] = ts

    def visible(self, pool: str, now: float, delay: float) -> dict[str, list[Sample]]:
        """Every series of ``pool`` with only the samples taken at or before ``now - delay``."""
        cutoff = to_datetime(now - delay)
        out: dict[str, list[Sample]] = {}
        for name, q in self._pools.get(pool, {}).items():
            samples = list(q)
            while samples and samples[-1].timestamp > cutoff:  # appended in time order
                samples.pop()
            out[name] = samples
        return out

    def count(self, pool: str, name: str) -> int:
        return len(self._pools.get(pool, {}).get(name, ()))

    def drop(self, pool: str) -> None:
        self._pools.pop(pool, None)
        self.last_sample.pop(pool, None)

    def pools(self) -> Iterable[str]:
        return list(self._pools)


def resource_values(tvms: Iterable[TvmCounters]) -> dict[str, float]:
    """One pool sample of the resource series from its TVMs' last heartbeats; marks them counted.

    TVMs without a heartbeat since the previous sample are left out (the real service also has
    missing samples); with none at all, no resource sample is taken.
    """
    reporting = [c for c in tvms if c.fresh]
    if not reporting:
        return {}
    n = len(reporting)
    rx = tx = 0
    for c in reporting:
        # Counters restart at 0 when an agent's host reboots: never count a negative delta.
        if c.counted_rx is not None:
            rx += max(0, c.net_rx - c.counted_rx)
            tx += max(0, c.net_tx - c.counted_tx) if c.counted_tx is not None else 0
        c.counted_rx, c.counted_tx = c.net_rx, c.net_tx
        c.fresh = False
    return {
        "CPUPercent": sum(c.cpu_percent for c in reporting) / n,
        "MemoryBytes": sum(c.memory_bytes for c in reporting) / n,
        "DiskBytes": sum(c.disk_bytes for c in reporting) / n,
        "NetworkInBytes": float(rx),
        "NetworkOutBytes": float(tx),
    }
