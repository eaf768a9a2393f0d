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

log = logging.getLogger("tvm.agent")

KEY_USERS = "/proc/key-users"
_after_clear: dict[int, bytes] = {}  # uid -> its /proc/key-users counts after the last clear
_warned = False

try:
    from .launch import _clone3  # type: ignore[attr-defined]

    _clear = _clone3.clear_keyrings
except (ImportError, AttributeError):
    _clear = None


def _counts(path: str = KEY_USERS) -> dict[int, bytes]:
    """uid -> "nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes" (not the usage count, which moves with
    the uid's processes)."""
    out: dict[int, bytes] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return out
    for line in data.splitlines():
        uid, _, rest = line.partition(b":")
        fields = rest.split()
        if len(fields) >= 4 and uid.strip().isdigit():
            out[int(uid)] = b" ".join(fields[1:])
    return out


def used(uid: int, path: str = KEY_USERS) -> bool:
    """The uid's keyrings may hold something a task put there since they were last cleared."""
    now = _counts(path).get(uid)
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
    after = _counts(path).get(uid)  # without the helper too: said once, not swept every time
    if after is not None:
        _after_clear[uid] = after
    return _clear is not None
