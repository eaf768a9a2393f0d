"""The per-pool index of TVMs with a free slot, kept exact by the two containers that change it.

A placement pass used to look at every TVM of the account to find the few with room: with 1,000
TVMs that scan, run once per agent frame, cost more than everything else a task needs. Instead, a
TVM's `running` map (`RunningTasks`) and the store's table of TVMs (`TvmTable`) keep
`FreeSlots.by_pool[pool]` equal to "the TVMs in the table with fewer tasks than slots", whatever
code adds or removes a run or a TVM. The scheduler still checks state, scheduling, connection and
exclusivity on what the index gives it; the index only saves the scan of full TVMs.
"""

from __future__ import annotations

from typing import Any, Protocol


class _Rec(Protocol):
    name: str
    pool: str


class _Owner(Protocol):
    rec: _Rec
    slots: int
    index: dict[str, Any] | None
    running: dict[str, Any]


class RunningTasks(dict[str, Any]):
    """A TVM's running tasks (task key -> TaskRec) that tells the pool's index when the TVM fills up
    or gets room again. Only the methods the core uses change it; the others are refused so the index
    can never be bypassed."""

    __slots__ = ("owner",)

    def __init__(self, owner: _Owner) -> None:
        super().__init__()
        self.owner = owner

    def _sync(self) -> None:
        o = self.owner
        index = o.index
        if index is None:
            return
        if len(self) < o.slots:
            index[o.rec.name] = o
        else:
            index.pop(o.rec.name, None)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._sync()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._sync()

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._sync()
        return value

    def clear(self) -> None:
        super().clear()
        self._sync()

    def _refused(self, *_: Any, **__: Any) -> Any:
        raise TypeError("RunningTasks changes only through [k]=v, del, pop and clear")

    update = setdefault = popitem = __ior__ = _refused  # type: ignore[assignment]


class FreeSlots:
    """pool name -> {TVM name: TVM} of the TVMs with at least one free slot."""

    __slots__ = ("by_pool",)

    def __init__(self) -> None:
        self.by_pool: dict[str, dict[str, Any]] = {}

    def attach(self, tvm: _Owner) -> None:
        index = tvm.index = self.by_pool.setdefault(tvm.rec.pool, {})
        if len(tvm.running) < tvm.slots:
            index[tvm.rec.name] = tvm

    def detach(self, tvm: _Owner) -> None:
        if tvm.index is not None:
            # The pool's dict stays even when empty: the pool's other TVMs hold it.
            tvm.index.pop(tvm.rec.name, None)
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

    update = setdefault = popitem = __ior__ = _refused  # type: ignore[assignment]
