"""Pool usage metrics (the Azure `/poolusagemetrics`): core hours per pool and half-hour interval,
from the time each TVM has been in its pool.

A TVM still in its pool counts from its `created` time to now; when one leaves, its core-seconds
are added per interval to its pool's record (`PoolRec.usage`, journaled with the pool), so they
survive it and a coordinator restart. A deleted pool's usage goes with it. Intervals older than
`KEEP_S` are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .records import PoolRec, Tvm
from .store import Store

INTERVAL_S = 1800  # Azure aggregates usage over half hours
KEEP_S = 31 * 86400


@dataclass(frozen=True)
class UsageRow:
    pool: str
    vm_size: str
    start: float
    core_hours: float


def split(start: float, end: float) -> Iterator[tuple[int, float]]:
    """(interval start, seconds in it) of the time from `start` to `end`."""
    t = start
    while t < end:
        bucket = int(t // INTERVAL_S) * INTERVAL_S
        stop = min(end, bucket + INTERVAL_S)
        yield bucket, stop - t
        t = stop


def _cores(store: Store, pool: PoolRec) -> int:
    size = store.size_of(pool)
    return size[0] if size is not None else 1


def tvm_left(store: Store, tvm: Tvm, now: float) -> PoolRec | None:
    """Fold a departing TVM's time into its pool's record; the pool to journal (None: gone)."""
    pool = store.pools.get(tvm.rec.pool)
    if pool is None:
        return None
    cores = _cores(store, pool)
    usage = dict(pool.usage)
    for bucket, seconds in split(tvm.rec.created, now):
        key = str(bucket)
        usage[key] = usage.get(key, 0.0) + seconds * cores
    horizon = now - KEEP_S
    pool.usage = {k: v for k, v in usage.items() if float(k) >= horizon}
    return pool


def metrics(
    store: Store, now: float, start: float, end: float, *, partial: bool = False
) -> list[UsageRow]:
    """Rows of the intervals that begin in [start, end), oldest first, per pool: complete ones
    only, unless `partial` (then the one now is in counts up to now)."""
    current = int(now // INTERVAL_S) * INTERVAL_S
    last_complete = current + INTERVAL_S if partial else current
    rows: list[UsageRow] = []
    for name, pool in sorted(store.pools.items()):
        cores = _cores(store, pool)
        seconds: dict[int, float] = {int(float(k)): v for k, v in pool.usage.items()}
        for tvm in store.all_pool_tvms(name):
            for bucket, s in split(tvm.rec.created, now):
                seconds[bucket] = seconds.get(bucket, 0.0) + s * cores
        for bucket in sorted(seconds):
            if start <= bucket < end and bucket < last_complete and seconds[bucket] > 0:
                hours = round(seconds[bucket] / 3600.0, 6)
                rows.append(UsageRow(name, pool.spec.vm_size, float(bucket), hours))
    rows.sort(key=lambda r: (r.start, r.pool))
    return rows
