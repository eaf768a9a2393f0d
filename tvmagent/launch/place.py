"""Where a task's clone3 runs: on the event loop itself, or in the launcher thread (batch.py).

With CLONE_VFORK the caller waits until the child has exec'ed. On an idle host that wait is short
(the child runs on the CPU its parent gives up) and the thread costs more than it saves: the loop
wakes the thread, the thread takes the GIL from the loop, clones, hands the child back and gives
the GIL back, and the child's end comes back through the thread too — ~0.4 ms of a lone task's
~3 ms round trip here. On a busy host the child may queue for a CPU for milliseconds, and a loop
held that long delays every other start and end: starts go to the thread there.

`auto` (the default) decides per start: on the loop when the thread has nothing queued or under
way (a start made here would overtake those) and the host is not busy: its load average over the
last minute is below its number of CPUs. (The instantaneous count of runnable tasks is no guide:
the coordinator and its journal are running at the moment of a lone task's start as well.)
TVM_AGENT_CLONE_ON=loop or =thread fixes the place (tests, and hosts where `auto` misjudges).
"""

from __future__ import annotations

import logging
import math
import os
import time

from .batch import BatchThread

log = logging.getLogger("tvm.agent")

_now = time.monotonic  # (tests replace it)

ENV = "TVM_AGENT_CLONE_ON"
MODES = ("auto", "loop", "thread")


def host_load() -> float:
    """The host's load average over the last minute; infinite when it cannot be read, so that
    `auto` keeps to the thread."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.inf


class ClonePlace:
    def __init__(self, setting: str | None = None) -> None:
        raw = os.environ.get(ENV, "") if setting is None else setting
        mode = raw.strip().lower() or "auto"
        if mode not in MODES:
            log.warning("%s=%r is not one of %s: using auto", ENV, raw, ", ".join(MODES))
            mode = "auto"
        self.mode = mode
        self._cpus = os.cpu_count() or 1
        self._quiet = (False, -math.inf)  # the last look at the load, and when

    def on_loop(self, thread: BatchThread) -> bool:
        """Clone this start on the event loop (True) or hand it to `thread` (False)."""
        if self.mode != "auto":
            return self.mode == "loop"
        return not thread.busy() and self._host_quiet()

    def _host_quiet(self) -> bool:
        # The kernel updates the load average every 5 s: one look a second is plenty.
        now = _now()
        quiet, seen = self._quiet
        if now - seen >= 1.0:
            quiet = host_load() < self._cpus
            self._quiet = (quiet, now)
        return quiet
