"""The coordinator's clock: wall time that does not step when the host's clock is set.

The core takes one clock for both what it shows (creation and state times) and what it measures
(job maxWallClockTime, heartbeat and link timeouts, the unknown-TVM timeout, autoscale intervals).
A step of the host's wall clock (an operator's `date -s`, a first NTP sync) would turn into a
false elapsed time: a jump forward would end jobs and declare live agents lost at once, a jump
back would stretch every limit by the jump. `SteadyClock` advances with the monotonic clock: a
step (the wall clock and the monotonic one disagree by more than `STEP_S` between two readings)
is absorbed, then given back slowly (`SLEW`, 1 % of elapsed time) so the timestamps converge on
the wall clock again while every duration measured meanwhile stays within 1 % of the truth. It
never goes backwards. A restart takes the wall clock as it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class SteadyClock:
    STEP_S = 1.0  # a larger wall/monotonic disagreement between two readings is a step
    SLEW = 0.01  # seconds of an absorbed step given back per elapsed second

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._mono = mono
        self._last_wall = wall()
        self._last_mono = mono()
        self._last_out = self._last_wall
        self.offset = 0.0  # added to the wall clock: the steps not yet given back
        self.steps = 0  # steps absorbed (metrics, tests)

    def __call__(self) -> float:
        # Read a few times per task: comparisons rather than max/abs/min calls (half the cost).
        wall = self._wall()
        mono = self._mono()
        elapsed = mono - self._last_mono
        if elapsed < 0.0:
            elapsed = 0.0
        step = (wall - self._last_wall) - elapsed
        self._last_wall = wall
        self._last_mono = mono
        if step > self.STEP_S or step < -self.STEP_S:
            self.offset -= step
            self.steps += 1
        if self.offset:
            give = min(abs(self.offset), self.SLEW * elapsed)
            self.offset -= math.copysign(give, self.offset)
        out = wall + self.offset
        if out < self._last_out:
            out = self._last_out
        self._last_out = out
        return out
