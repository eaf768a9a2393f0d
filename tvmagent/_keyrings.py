"""A task user's kernel keyrings, emptied before its uid runs another task.

The kernel keeps a user keyring and a user-session keyring per uid, and they outlive the uid's
processes: a key one task stored there (`keyctl padd user ... @u`, a Kerberos KEYRING cache) the
next task given the same slot user would read. Root cannot open another uid's keyrings, so the
compiled helper (`launch/_clone3.c`) forks a child that takes the uid and clears them.

Whether a uid has anything to clear is read from /proc/key-users, one small file: its line (key
counts and bytes) changes with every key added, and is remembered as it was after the last clear.
Without the compiled helper the keyrings are not cleared; the agent says so once.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tvm.agent")

KEY_USERS = "/proc/key-users"
_after_clear: dict[int, bytes] = {}  # uid -> its /proc/key-users counts after the last clear
_warned = False

try:
    from .launch import _clone3  # type: ignore[attr-defined]

    _clear = _clone3.clear_keyrings
except (ImportError, AttributeError):
    _clear = None


def _counts(uid: int, path: str = KEY_USERS) -> bytes | None:
    """The uid's "nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes" (not its usage count, which moves
    with its processes); None when it has no keys. Asked after every task: one read, one search."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = b"\n" + os.read(fd, 65536)  # a line per uid with keys: ~40 bytes each
            while len(data) > 65536 and (more := os.read(fd, 65536)):
                data += more
        finally:
            os.close(fd)
    except OSError:
        return None
    for tag in (b"\n%d:" % uid, b" %d:" % uid):  # "%5u:": right-aligned, or not when wider
        at = data.find(tag)
        if at >= 0:
            break
    else:
        return None
    end = data.find(b"\n", at + 1)
    line = data[at + len(tag) : end if end >= 0 else None]
    return b" ".join(line.split()[1:])


def used(uid: int, path: str = KEY_USERS) -> bool:
    """The uid's keyrings may hold something a task put there since they were last cleared."""
    now = _counts(uid, path)
    return now is not None and now != _after_clear.get(uid)


def clear_if_used(uid: int, gid: int, path: str = KEY_USERS) -> bool:
    """(blocking) Empty the uid's keyrings if `used`; True when they were. OSError if it could
    not."""
    global _warned
    if not used(uid, path):
        return False
    if _clear is None:
        if not _warned:
            _warned = True
            log.warning(
                "DEGRADED: task users' kernel keyrings are not emptied between tasks (the agent's "
                "compiled helper is missing): a key one task stores there, the next task of the "
                "same task user can read"
            )
    else:
        _clear(uid, gid)
    # The kernel collects what the clear unlinked a little later: the counts then move once
    # more, and the next look clears once more (with nothing left to unlink).
    after = _counts(uid, path)  # without the helper too: said once, not swept every time
    if after is not None:
        _after_clear[uid] = after
    return _clear is not None
