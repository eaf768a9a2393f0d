"""The coordinator's garbage-collector policy: a young generation sized for a server.

CPython's default collects the young generation every 700 allocations. A request, a journal
commit or an agent's frame allocates more than that while it is in flight, so its objects survive
two young collections and are promoted to the oldest generation; that generation's growth then
triggers full collections, each of which walks every agent link's coroutines and frames (150 ms of
CPU with 1,000 agents linked, twenty of them in 50,000 placements). With a young generation of
20,000 allocations what lives for one request dies young, and full collections become rare. The
cost: up to that many unreachable objects wait a little longer to be freed (a few MiB at most).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG = 20_000

_depth = 0
_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def server_gc() -> Iterator[None]:
    """Use the server's thresholds while the block runs (several coordinators in one process, as
    in tests: the first to enter sets them, the last to leave puts back what was there)."""
    global _depth, _saved
    if _depth == 0:
        _saved = gc.get_threshold()
        gc.set_threshold(max(YOUNG, _saved[0]), *_saved[1:])
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.set_threshold(*_saved)
