"""Which coordinator a client asks, and when it asks again (URL1,URL2: one active coordinator and
its standbys over a shared store).

A standby answers 503 `CoordinatorStandby` and has done nothing: the request is safe to repeat,
at the next URL. A connection that could not be made did nothing either. A connection lost after
the request went out may have been acted on: only requests that mean the same when repeated (GET,
HEAD, PUT, DELETE) are repeated then. With one URL nothing is retried (the caller sees the error at
once, as before); with several, the client keeps trying for `FailoverPolicy.timeout` seconds,
the time a standby needs to take over.
"""

from __future__ import annotations

import time
from typing import Any

import httpx2

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout)


class FailoverPolicy:
    def __init__(self, endpoints: int, timeout: float = 45.0) -> None:
        self.enabled = endpoints > 1
        self.timeout = timeout

    def start(self) -> _Attempt:
        return _Attempt(self)


class _Attempt:
    """One request's tries. Each `after_*` returns the seconds to wait before trying again (the
    client has moved to the next URL by then), or None: give the caller this outcome."""

    def __init__(self, policy: FailoverPolicy) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + policy.timeout
        self.tries = 0

    def after_error(self, client: Any, method: str, exc: Exception) -> float | None:
        if not isinstance(exc, _NOT_SENT) and method.upper() not in _IDEMPOTENT:
            return None
        return self._next(client, 0.0)

    def after_response(self, client: Any, resp: Any) -> float | None:
        if resp.status_code != 503 or resp.headers.get("x-tvm-error-code") != "CoordinatorStandby":
            return None
        try:
            retry_after = float(resp.headers.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        return self._next(client, min(retry_after, 2.0))

    def _next(self, client: Any, pause: float) -> float | None:
        if not self.policy.enabled or time.monotonic() >= self.deadline:
            return None
        self.tries += 1
        urls = client.endpoints
        client.endpoint = urls[(urls.index(client.endpoint) + 1) % len(urls)]
        # A whole round without an active coordinator: wait before the next round.
        if self.tries % len(urls) == 0:
            return max(pause, 0.5)
        return 0.0
