"""The per-pool index of TVMs with a free slot, kept by the two containers that change it.

A placement pass used to look at every TVM of the account to find the few with room: with 1,000
TVMs that scan, run once per agent frame, cost more than everything else a task needs. Instead, the
store's table of TVMs (`TvmTable`) and each TVM's `running` map (`RunningTasks`) keep, per pool, a
superset of the TVMs with a free slot: a TVM enters when it is added and whenever a task leaves it,
whatever code removes the task; `with_room` drops the ones that filled up (lazily, so a placement,
the hot path, costs nothing extra). The scheduler still checks state, scheduling, connection and
exclusivity on what the index gives it; the index only saves the scan of full TVMs.
"""

from __future__ import annotations

from typing import Any

from protocol import messages as pm

_pop = dict.pop
_get = dict.get
_setitem = dict.__setitem__
_delitem = dict.__delitem__
_clear = dict.clear


# Short tasks an agent that keeps a task queue (Hello capability TASK_QUEUE) may hold per slot
# beyond its slots: its next task starts without a round trip to the coordinator.
QUEUE_PER_SLOT = 3


def queue_depth(slots: int, capabilities: list[str]) -> int:
    """How many tasks beyond its slots a TVM whose agent has `capabilities` may hold."""
    return slots * QUEUE_PER_SLOT if pm.TASK_QUEUE in capabilities else 0


class RunningTasks(dict[str, Any]):
    """A TVM's running tasks (task key -> TaskRec) that puts the TVM back among its pool's candidates
    whenever a slot frees. A TVM that fills up is dropped from the candidates by the next
    `FreeSlots.with_room`, not here. `extra`: the slots its tasks take beyond one each
    (`requiredSlots` - 1, summed), so the slots in use are `len(self) + extra`."""

    __slots__ = ("owner", "extra")

    def __init__(self, owner: Any) -> None:  # a records.Tvm (records imports this module)
        super().__init__()
        self.owner = owner
        self.extra = 0

    def __setitem__(self, key: str, task: Any) -> None:
        old = _get(self, key)
        if old is not None:
            self.extra -= old.slots - 1
        _setitem(self, key, task)
        self.extra += task.slots - 1

    def __delitem__(self, key: str) -> None:
        self.extra -= self[key].slots - 1
        _delitem(self, key)
        o = self.owner
        if o.index is not None:
            o.index[o.rec.name] = o

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.extra -= self[key].slots - 1
        value = _pop(self, key, *default)
        o = self.owner
        if o.index is not None:
            o.index[o.rec.name] = o
        return value

    def clear(self) -> None:
        _clear(self)
        self.extra = 0
        o = self.owner
        if o.index is not None:
            o.index[o.rec.name] = o

    def popitem(self) -> tuple[str, Any]:
        raise TypeError("RunningTasks frees slots only through del, pop and clear")


class FreeSlots:
    """`by_pool`: pool name -> {TVM name: TVM}: every TVM of the pool with a free slot, and perhaps
    some that filled up since the last `with_room` (which drops them). `queues`: likewise, the
    TVMs `with_room` dropped whose agent's queue may still take tasks (`Tvm.queue`), read only
    when tasks are queued: a pool of busy TVMs costs a pass nothing while its jobs are not."""

    __slots__ = ("by_pool", "queues")

    def __init__(self) -> None:
        self.by_pool: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}

    def with_room(self, pool: str) -> list[Any]:
        """The pool's TVMs with at least one free slot (exact)."""
        index = self.by_pool.get(pool)
        if not index:
            return []
        out = []
        full = []
        for name, t in index.items():
            if len(t.running) + t.running.extra < t.slots:
                out.append(t)
            else:
                full.append(name)
        for name in full:
            t = index.pop(name)
            if t.queue:
                self.queues.setdefault(pool, {})[name] = t
        return out

    def with_queue_room(self, pool: str) -> list[Any]:
        """The pool's TVMs whose slots are taken and whose agent's queue has room (exact, once
        `with_room` has looked at the pool)."""
        index = self.queues.get(pool)
        if not index:
            return []
        out = []
        gone = []
        for name, t in index.items():
            used = len(t.running) + t.running.extra
            if t.index is None or used < t.slots:  # removed, or back among those with a free slot
                gone.append(name)
            elif used < t.slots + t.queue:
                out.append(t)
            else:
                gone.append(name)  # full: back in `by_pool` when a task leaves
        for name in gone:
            del index[name]
        return out

    def attach(self, tvm: Any) -> None:
        index = tvm.index = self.by_pool.setdefault(tvm.rec.pool, {})
        index[tvm.rec.name] = tvm

    def detach(self, tvm: Any) -> None:
        name = tvm.rec.name
        if tvm.index is not None:
            # The pool's dict stays even when empty: the pool's other TVMs hold it.
            tvm.index.pop(name, None)
            queues = self.queues.get(tvm.rec.pool)
            if queues is not None and queues.get(name) is tvm:
                del queues[name]
        tvm.index = None


class TvmTable(dict[str, Any]):
    """The store's TVMs by name; putting a TVM in (or taking it out) enters it in (or removes it from)
    the free-slot index."""

    __slots__ = ("free",)

    def __init__(self, free: FreeSlots) -> None:
        super().__init__()
        self.free = free

    def __setitem__(self, key: str, tvm: Any) -> None:
        old = super().get(key)
        if old is not None and old is not tvm:
            self.free.detach(old)
        super().__setitem__(key, tvm)
        self.free.attach(tvm)

    def __delitem__(self, key: str) -> None:
        self.free.detach(super().__getitem__(key))
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.free.detach(super().__getitem__(key))
        return super().pop(key, *default)

    def clear(self) -> None:
        for tvm in self.values():
            self.free.detach(tvm)
        super().clear()

    def _refused(self, *_: Any, **__: Any) -> Any:
        raise TypeError("TvmTable changes only through [k]=v, del, pop and clear")

    update = setdefault = popitem = __ior__ = _refused
