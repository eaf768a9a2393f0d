"""Clients waiting for a task to complete (`GET …/tasks/{t}?waitForCompletion=PT30S`).

A waiter is woken right after the core has applied the change that completed (or removed) its task,
instead of the client polling: the wait costs nothing while nobody waits, and one dictionary look-up
per waited task per applied batch while someone does.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class DoneWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, list[trio.Event]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self, key: str, seconds: float) -> None:
        """Until `poke` finds task `key` done, or for `seconds` at most."""
        ev = trio.Event()
        self._waiting.setdefault(key, []).append(ev)
        try:
            with trio.move_on_after(seconds):
                await ev.wait()
        finally:
            left = self._waiting.get(key)
            if left is not None:
                if ev in left:
                    left.remove(ev)
                if not left:
                    del self._waiting[key]

    def poke(self, done: Callable[[str], bool]) -> None:
        """Wake the waiters of every task `done(key)` says is finished."""
        for key in [k for k in self._waiting if done(k)]:
            for ev in self._waiting.pop(key):
                ev.set()
