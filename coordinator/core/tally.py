"""A job's task counts kept as its tasks change, so reading them costs the same for any job size.

Every task state change goes through `states.move_task`, which tells the job's tally; adding,
replacing (reactivate) and deleting a task tell it here. A completed task counts as succeeded or
failed by its exit code and failure when it completes: both are set before the move, and completed
is final (a reactivated task is a new record).
"""

from __future__ import annotations

from typing import Protocol

from coordinator.common import models as m

from .states import ACTIVE, RUNNING


class Counted(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def failure(self) -> tuple[str, str, str] | None: ...


class TaskTally:
    __slots__ = ("active", "running", "succeeded", "failed")

    def __init__(self) -> None:
        self.active = 0  # queued, retried, requeued or waiting for dependencies
        self.running = 0
        self.succeeded = 0
        self.failed = 0

    def _bump(self, rec: Counted, d: int) -> None:
        s = rec.state
        if s == ACTIVE:
            self.active += d
        elif s == RUNNING:
            self.running += d
        elif rec.exit_code == 0 and rec.failure is None:
            self.succeeded += d
        else:
            self.failed += d

    def add(self, rec: Counted) -> None:
        self._bump(rec, 1)

    def remove(self, rec: Counted) -> None:
        self._bump(rec, -1)

    def moved(self, old: str, rec: Counted) -> None:
        """`rec` went from `old` (active or running: completed has no way out) to its state."""
        if old == ACTIVE:
            self.active -= 1
        else:
            self.running -= 1
        self._bump(rec, 1)

    def counts(self) -> m.TaskCounts:
        return m.TaskCounts(
            active=self.active,
            running=self.running,
            completed=self.succeeded + self.failed,
            succeeded=self.succeeded,
            failed=self.failed,
        )
