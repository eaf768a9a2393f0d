"""Task users' sweeps, one walk of /tmp, /var/tmp, /dev/shm and /dev/mqueue for all the users
waiting at a moment.

A task user is swept (tvmagent/_uid_sweep.py) before its uid runs another task whenever a
directory it could write into changed during its task. On a host where other processes use /tmp,
that is nearly every task, and the walk of the roots, not the number of uids looked for, is the
cost. So a sweep asked for while a walk runs waits for the next walk, which covers every uid asked
for meanwhile: each uid is still swept by a walk that started after its task ended.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Protocol

import trio

from . import _ipc_sweep, _keyrings
from ._uid_sweep import SWEEP_ROOTS, kill_uid, sweep_uids


class SweptUser(Protocol):
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


class _Ask:
    __slots__ = ("done", "error", "user")

    def __init__(self, user: SweptUser) -> None:
        self.user = user
        self.done = trio.Event()
        self.error: BaseException | None = None


class Sweeps:
    """`kill()`: whether the uids' processes must be killed first (no cgroup held the trees);
    `refresh()`: called after each walk (the TmpWatch record of what the walk left); `roots`:
    where to walk (tests walk a private tree)."""

    def __init__(
        self,
        kill: Callable[[], bool],
        refresh: Callable[[], None],
        roots: tuple[str, ...] = SWEEP_ROOTS,
    ) -> None:
        self._kill = kill
        self._refresh = refresh
        self._roots = roots
        self._asks: list[_Ask] = []
        self._walking = False
        self._walk_ended = trio.Event()
        self.walks = 0  # how many walks ran (tests: several uids share one)

    async def sweep(self, user: SweptUser) -> None:
        """Remove what `user`'s uid left (processes, files, System V IPC objects); raises what
        removing them raised. Not cancellable: the caller shields it (the user stays dirty)."""
        ask = _Ask(user)
        self._asks.append(ask)
        while not ask.done.is_set():
            if self._walking:  # asked during a walk: the next one covers it
                await self._walk_ended.wait()
            else:  # the first to see no walk walks for everyone waiting, itself included
                await self._walk_once()
        if ask.error is not None:
            raise ask.error

    async def _walk_once(self) -> None:
        self._walking = True
        batch, self._asks = self._asks, []
        errors: dict[int, BaseException] = {}
        try:
            errors = await trio.to_thread.run_sync(self._walk, [a.user for a in batch])
        except BaseException as exc:  # the walker raises it; the others: not swept
            errors = {id(a.user): OSError(f"the sweep failed: {exc!r}") for a in batch}
            raise
        finally:
            for a in batch:
                a.error = errors.get(id(a.user))
                a.done.set()
            self._walking = False
            self._walk_ended.set()
            self._walk_ended = trio.Event()

    def _walk(self, users: list[SweptUser]) -> dict[int, BaseException]:
        """(worker thread) Processes first (a live one could write again after the walk), then
        one walk for the files of all, then each one's IPC objects and keyrings."""
        self.walks += 1
        errors: dict[int, BaseException] = {}
        kill = self._kill()
        live = []
        for u in users:
            try:
                if kill:
                    kill_uid(u.uid, u.gid)
                live.append(u)
            except (OSError, subprocess.SubprocessError) as exc:
                errors[id(u)] = exc
        try:
            if live:
                sweep_uids(frozenset(u.uid for u in live), self._roots)
        except OSError as exc:
            for u in live:
                errors[id(u)] = exc
        for u in live:
            if id(u) not in errors:
                try:
                    _ipc_sweep.remove_owned(u.uid)
                    _keyrings.clear_if_used(u.uid, u.gid)
                except OSError as exc:
                    errors[id(u)] = exc
        self._refresh()
        return errors
