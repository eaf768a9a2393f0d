"""Helpers of the disk, load, fuzz and clock reliability suites (tests and benchmarks share them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from benchmarks.reliability import _diskfill
from benchmarks.reliability._diskfill import can_mount_tmpfs, fill
from coordinator.client import AsyncClient, BatchError
from coordinator.client._http import _Call


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    """`_diskfill.tmpfs`, the test skipped (with the reason) where none can be mounted."""
    try:
        cm = _diskfill.tmpfs(path, size)
        mounted = cm.__enter__()
    except _diskfill.TmpfsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield mounted
    finally:
        cm.__exit__(None, None, None)


async def raw(
    client: AsyncClient,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> httpx2.Response:
    """A signed request through the client's own signing, answered as the raw response (headers
    such as Retry-After stay visible)."""
    m, url, headers, content = client._prepare(_Call(method, path, body, params=params))
    return await client._http.request(m, url, headers=headers, content=content)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


__all__ = ["BatchError", "can_mount_tmpfs", "fill", "percentile", "raw", "tmpfs"]
