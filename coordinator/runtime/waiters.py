"""Clients waiting for a task to complete (`GET …/tasks/{t}?waitForCompletion=PT30S`).

A waiter is woken right after the core has applied the change that completed (or removed) its task,
instead of the client polling: the wait costs nothing while nobody waits, and one dictionary look-up
per waited task per applied batch while someone does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class DoneWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, list[Callable[[], None]]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(
        self, key: str, seconds: float, meanwhile: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Until `poke` finds task `key` done, for `seconds` at most, or until `meanwhile()`
        returns (e.g. the client hung up). One Trio task: the completion cancels the scope it
        waits in (a second task to watch the client cost a scheduling round and a nursery's exit
        on the round trip of every waited task)."""
        with trio.move_on_after(seconds) as scope:
            wake = scope.cancel
            self._waiting.setdefault(key, []).append(wake)
            try:
                await (meanwhile or trio.sleep_forever)()
            finally:
                left = self._waiting.get(key)
                if left is not None:
                    if wake in left:
                        left.remove(wake)
                    if not left:
                        del self._waiting[key]

    def poke(self, done: Callable[[str], bool]) -> None:
        """Wake the waiters of every task `done(key)` says is finished."""
        for key in [k for k in self._waiting if done(k)]:
            for wake in self._waiting.pop(key):
                wake()
