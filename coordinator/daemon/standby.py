"""Active/standby coordinators over one PostgreSQL store.

Every coordinator of the store listens on its own port from the start. Until it holds the store's
lease it is a standby: REST answers 503 `CoordinatorStandby` with `Retry-After`, agents' websockets
are refused, and clients and agents given several URLs move on to the next one. The active one
renews the lease; it stops — the process exits — as soon as it cannot be sure it still holds it
(`LeaseKeeper.check` before anything is sent, the store's fencing inside every commit), so two
coordinators never act at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from coordinator.runtime.journal import StoreFenced

log = logging.getLogger("tvm.standby")

RETRY_AFTER_S = 2


class SwitchApp:
    """An ASGI app that forwards to `target`, which becomes the real app once this coordinator
    is active."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.target(scope, receive, send)


class StandbyApp:
    """What a standby answers to everything (lifespan aside)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        # Unauthenticated callers read this: no store URL, no host names.
        body = json.dumps(
            {
                "code": "CoordinatorStandby",
                "message": (
                    "this coordinator is a standby: another coordinator of its store is active. "
                    "Retry later, or use another coordinator URL."
                ),
            }
        ).encode()
        prefix = "http."
        if kind == "websocket":
            # An agent link: denied with the same 503 answer (the ASGI denial-response extension),
            # so the agent can say why and try its next coordinator.
            await receive()  # websocket.connect
            if "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1013})  # try again later
                return
            prefix = "websocket.http."
        await send(
            {
                "type": prefix + "response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                    (b"x-tvm-error-code", b"CoordinatorStandby"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": prefix + "response.body", "body": body})


async def wait_for_lease(
    store: Any,
    ttl: float,
    poll: float,
    on_account: Callable[[str, str, str], None] | None = None,
) -> float:
    """Poll for the lease until this coordinator holds it; returns the seconds waited. Says once
    (and again when the holder changes) whom it waits for. `on_account(account, key, join_token)`
    is called once the store holds an account (made by whichever coordinator was active first)."""
    started = time.monotonic()
    said = None
    while True:
        try:
            if await trio.to_thread.run_sync(store.acquire, ttl):
                return time.monotonic() - started
            held = await trio.to_thread.run_sync(store.lease_holder)
            if on_account is not None:
                meta = await trio.to_thread.run_sync(store.all_meta)
                if meta.get("key1") and meta.get("join_token_plain"):
                    on_account(meta.get("account", ""), meta["key1"], meta["join_token_plain"])
                    on_account = None
        except StoreFenced:
            raise
        except Exception as exc:  # noqa: BLE001 - the database is down: keep waiting, say so
            held = None
            if said != "error":
                log.warning("standby: cannot reach %s: %s", store.path, exc)
                said = "error"
        if held is not None:
            if said != held[0]:
                log.warning(
                    "standby: %s is active on %s (lease expires in %.1f s); waiting",
                    held[0],
                    store.path,
                    max(0.0, held[1]),
                )
                said = held[0]
        await trio.sleep(poll)


class LeaseKeeper:
    """Renews the active coordinator's lease; knows, by its own monotonic clock, until when the
    lease is certainly still held (renewal sent + TTL, minus a margin for clock rate)."""

    def __init__(self, store: Any, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self.safe_until = time.monotonic() + ttl * 0.8

    def check(self) -> None:
        if time.monotonic() > self.safe_until:
            raise StoreFenced(
                f"the lease on {self.store.path} was not renewed in time; another coordinator "
                "may be active: stopping"
            )

    async def run(self) -> None:
        interval = self.ttl / 4
        while True:
            await trio.sleep(interval)
            sent = time.monotonic()
            try:
                with trio.move_on_after(self.ttl / 2):
                    ok = await trio.to_thread.run_sync(
                        self.store.renew, self.ttl, abandon_on_cancel=True
                    )
                    if not ok:
                        raise StoreFenced(
                            f"the lease on {self.store.path} was taken by another coordinator"
                        )
                    self.safe_until = sent + self.ttl * 0.8
                    continue
            except StoreFenced:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is slow or down: retry
                log.warning("cannot renew the lease on %s: %s", self.store.path, exc)
            self.check()
