"""One timer for the delayed acknowledgements of every agent link.

A link whose only output is an acknowledgement waits up to ACK_DELAY for messages to ride along
with it (see `links._writer`, and `CoordinatorService.ack_durable`, which registers links here
directly); then this timer writes the frame itself where it can (`send_now`), else pokes the
link's writer. That wait used to be a timeout per link and per ack: with 1,000
agents, each completion's ack set a deadline that then expired, and trio delivers an expired
deadline as a Cancelled exception raised and caught — a visible share of the coordinator's CPU per
task. Instead, a writer registers with this timer and waits for its ordinary wake-up; one task
pokes every link registered during the last ACK_DELAY, so the delay costs one sleep per period,
however many links wait.
"""

from __future__ import annotations

from typing import Protocol

import trio

# How long an acknowledgement alone waits for messages to ride along with. Agents answer RunTasks
# at once, so under load the ack of one frame of completions leaves with the next RunTask frame
# instead of in a frame of its own (every websocket frame costs the coordinator ~100 µs). The ack
# still follows the commit; only its own frame is saved.
ACK_DELAY = 0.01


class _Pokeable(Protocol):
    def poke(self) -> None: ...

    def send_now(self, ack: bool = False) -> bool: ...


class AckTimer:
    def __init__(self, delay: float = ACK_DELAY) -> None:
        self.delay = delay
        self._due: dict[_Pokeable, None] = {}  # insertion order: poked in the order they asked
        self._wake = trio.Event()

    def due(self, link: _Pokeable) -> None:
        """Poke `link` within `delay` (a link poked earlier for another reason just wakes twice)."""
        self._due[link] = None
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.delay)
            due, self._due = self._due, {}
            for link in due:
                if not link.send_now(ack=True):  # written here; else by the link's writer
                    link.poke()
