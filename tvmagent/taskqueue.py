"""The TVM's task slots and the tasks waiting for one (pure; `AgentState` owns one).

A coordinator that knows this agent queues (Hello capability `TASK_QUEUE`) may place a few short
tasks beyond the TVM's slots. They wait here, in arrival order, and start the moment a slot frees:
the next task starts without a round trip to the coordinator, and a busy agent's completions share
frames. A task that waited `WAIT_S` (a long task ahead of it, which the coordinator could not know)
is handed back unstarted so the coordinator can place it where a slot is free.
"""

from __future__ import annotations

from protocol import messages as pm

WAIT_S = 1.0


class Slots:
    """`capacity`: the TVM's slots (0: no TVM yet, or a coordinator older than QUEUE_MINOR, whose
    TaskSpecs do not say what a run takes: nothing waits). `busy`: the slots the started runs take.
    `waiting`: task key -> (spec, when it arrived), oldest first."""

    __slots__ = ("capacity", "busy", "waiting", "counted")

    def __init__(self) -> None:
        self.counted = False  # the coordinator's TaskSpecs say what each run takes
        self.capacity = 0
        self.busy = 0
        self.waiting: dict[str, tuple[pm.TaskSpec, float]] = {}

    def admit(self, spec: pm.TaskSpec, now: float) -> bool:
        """True: start it now (its slots are taken). False: it waits. Nothing overtakes a waiting
        task but a run in no slot, and a task wider than the TVM still starts once it is alone."""
        if (
            spec.slots  # a run the coordinator counts outside the slots (0) never waits
            and self.capacity
            and self.busy
            and (self.waiting or self.busy + spec.slots > self.capacity)
        ):
            self.waiting[spec.key] = (spec, now)
            return False
        self.busy += spec.slots
        return True

    def take(self, spec: pm.TaskSpec) -> None:
        """A run started without `admit` (the new attempt of a task whose old run just ended)."""
        self.busy += spec.slots

    def release(self, spec: pm.TaskSpec) -> list[pm.TaskSpec]:
        """`spec`'s run ended: its slots are free again. Returns the waiting tasks that start now."""
        self.busy = max(0, self.busy - spec.slots)
        out: list[pm.TaskSpec] = []
        while self.waiting:
            key, (nxt, _) = next(iter(self.waiting.items()))
            if self.busy and self.busy + nxt.slots > self.capacity:
                break
            del self.waiting[key]
            self.busy += nxt.slots
            out.append(nxt)
        return out

    def withdraw(self, key: str) -> tuple[pm.TaskSpec, float] | None:
        """Take a waiting task out (cancelled, deleted): (its spec, when it arrived), or None when
        `key` does not wait."""
        return self.waiting.pop(key, None)

    def overdue(self, now: float) -> list[tuple[pm.TaskSpec, float]]:
        """Take out the tasks that have waited `WAIT_S` or longer."""
        late = [k for k, (_, since) in self.waiting.items() if now - since >= WAIT_S]
        return [self.waiting.pop(k) for k in late]

    def clear(self) -> list[tuple[pm.TaskSpec, float]]:
        """Take out every waiting task."""
        out = list(self.waiting.values())
        self.waiting.clear()
        return out
