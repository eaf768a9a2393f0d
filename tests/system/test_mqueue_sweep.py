"""A task user's POSIX message queues are found and removed by the uid sweep, also on a host that
has no /dev/mqueue mount (the agent's own mount, attached nowhere), and a queue made after the
sweep's record is a change (the mqueue file system keeps whole seconds)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

import pytest

from tvmagent import _mqueue
from tvmagent._uid_sweep import TmpWatch, sweep_uid

UID = 3_999_000 + os.getpid() % 1000  # a uid nobody on the host has: its sweep touches nothing else
NAME = f"/tvm-mq-test-{os.getpid()}"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making queues as another uid needs root")

MAKE = f"""
import ctypes, os
rt = ctypes.CDLL('librt.so.1', use_errno=True)
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
q = rt.mq_open({NAME.encode()!r}, os.O_CREAT | os.O_WRONLY, 0o600, None)
assert q >= 0 and rt.mq_send(q, b'secret', 6, 0) == 0, ctypes.get_errno()
"""


def _as_uid(code: str) -> None:
    setpriv = ["setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups"]
    subprocess.run([*setpriv, "/usr/bin/python3", "-c", code], check=True, cwd="/")


def _exists() -> bool:
    return NAME[1:] in os.listdir(_mqueue.root())


def test_a_queue_left_by_a_uid_is_seen_and_swept() -> None:
    root = _mqueue.root()
    if root == _mqueue.MQUEUE and not os.path.isdir(root):
        pytest.skip("no /dev/mqueue and no private mqueue mount here")
    watch = TmpWatch((_mqueue.MQUEUE,))
    try:
        for _ in range(30):  # a record is trusted only once its whole-second mtime is past
            watch.refresh()
            if (base := watch.baseline()) is not None:
                break
            time.sleep(0.2)
        assert base is not None
        _as_uid(MAKE)
        assert _exists()
        assert not watch.unchanged(base)  # the sweep is not skipped
        assert sweep_uid(UID) == 1
        assert not _exists()
    finally:
        ctypes.CDLL("librt.so.1").mq_unlink(NAME.encode())
