"""Step bookkeeping for the client scripts in this directory (they import it from beside them).
Standard library only: it runs inside the clients' own virtual environments.

Each step is recorded as passed or failed with the error the client raised (HTTP status, Azure error
code and message where there is one), so one run reports every part of the API that is missing or
wrong instead of stopping at the first. A failed step marked `fatal` skips the steps that need it;
the script's last stdout line is the JSON report.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Abort(Exception):
    """A fatal step failed: the rest of the flow cannot run."""


def describe(exc: BaseException) -> str:
    """The error as an API user sees it: status, Azure code and message, else the exception."""
    parts = [type(exc).__name__]
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if status is not None:
        parts.append(f"HTTP {status}")
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    if code:
        parts.append(f"code={code}")
    message = getattr(error, "message", None)
    value = getattr(message, "value", message)
    if value:
        parts.append(f"message={value!s}"[:400])
    text = str(exc)
    if text and len(parts) < 3:
        parts.append(text[:600])
    if not code and response is not None:
        body = getattr(response, "text", None)
        try:
            body = body() if callable(body) else body
        except Exception:  # noqa: BLE001 - best effort: a streamed body may be gone
            body = None
        if body:
            parts.append(f"body={str(body)[:400]}")
    return "; ".join(parts)


class Report:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: dict[str, str] = {}
        self.skipped: list[str] = []
        self.aborted = False
        self.facts: dict[str, Any] = {}

    @contextmanager
    def step(self, name: str, *, fatal: bool = False) -> Iterator[None]:
        """`with report.step("create pool", fatal=True): ...`"""
        if self.aborted:
            self.skipped.append(name)
            raise Abort(name)
        started = time.monotonic()
        try:
            yield
        except Abort:
            raise
        except Exception as exc:  # noqa: BLE001 - every client error is a finding
            self.failed[name] = describe(exc)
            print(f"FAIL {name}: {self.failed[name]}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            if fatal:
                self.aborted = True
                self.facts["aborted_at"] = name
                raise Abort(name) from exc
        else:
            self.passed.append(name)
            print(f"ok   {name} ({time.monotonic() - started:.1f} s)", file=sys.stderr)

    def dump(self) -> int:
        print(
            json.dumps(
                {
                    "passed": self.passed,
                    "failed": self.failed,
                    "skipped": self.skipped,
                    "facts": self.facts,
                }
            )
        )
        return 1 if self.failed else 0


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = cond()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
