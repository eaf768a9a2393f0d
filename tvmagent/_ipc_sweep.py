"""System V IPC objects (shared memory, semaphores, message queues) a task user left behind.

They outlive the process that made them and are not files: a 0600 segment left by one task would
be attached by the next task given the same slot uid. Linux lists them in /proc/sysvipc/; removing
one takes `shmctl`/`semctl`/`msgctl(IPC_RMID)` (as root). A segment still attached is only marked
for removal, and goes with its last user — who is dead by then (the uid's processes are killed
before its sweep).
"""

from __future__ import annotations

import ctypes
import os

IPC_RMID = 0
# The *_INFO commands: how many objects of each kind exist in the caller's IPC namespace (that of
# the tasks, which share the agent's), with no table to read.
SHM_INFO, SEM_INFO, MSG_INFO = 14, 19, 12
PROC = "/proc/sysvipc"
# (table, id column): owner (`uid`) and creator (`cuid`) columns are found by name.
_TABLES = (("shm", "shmid"), ("sem", "semid"), ("msg", "msqid"))
_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def any_exist() -> bool:
    """Whether any System V IPC object exists in this IPC namespace (True when that cannot be
    told). Three system calls: no table is read on a host that has none, the usual case."""
    libc = _libc_handle()
    info = (ctypes.c_int * 32)()  # larger than shm_info, seminfo and msginfo
    # shm_info.used_ids, seminfo.semusz, msginfo.msgpool: the kinds' objects in use.
    for call, index in (
        (lambda: libc.shmctl(0, SHM_INFO, info), 0),
        (lambda: libc.semctl(0, 0, SEM_INFO, info), 7),
        (lambda: libc.msgctl(0, MSG_INFO, info), 0),
    ):
        ctypes.memset(info, 0, ctypes.sizeof(info))
        if call() < 0 or info[index] != 0:
            return True
    return False


def owned(uid: int, proc: str = PROC) -> list[tuple[str, int]]:
    """(kind, id) of every IPC object `uid` owns or created. Asked after every task: where none
    exists at all (the usual case) three `*_INFO` calls tell so; else a table holding only its
    header line costs one open and read."""
    found: list[tuple[str, int]] = []
    if proc == PROC and not any_exist():
        return found
    for kind, id_col in _TABLES:
        try:
            fd = os.open(f"{proc}/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, 65536)
                if data.count(b"\n") > 1 or not data.endswith(b"\n"):  # rows, or more to read
                    while chunk := os.read(fd, 65536):
                        data += chunk
            finally:
                os.close(fd)
        except OSError:
            continue  # no System V IPC here
        header_line, _, rest = data.decode(errors="replace").partition("\n")
        header = header_line.split()
        rows = rest.splitlines()
        if not rows:
            continue
        try:
            i_id, i_uid, i_cuid = header.index(id_col), header.index("uid"), header.index("cuid")
        except ValueError:
            continue
        for line in rows:
            cols = line.split()
            if len(cols) > max(i_id, i_uid, i_cuid) and uid in (
                int(cols[i_uid]),
                int(cols[i_cuid]),
            ):
                found.append((kind, int(cols[i_id])))
    return found


def remove_owned(uid: int) -> int:
    """Remove what `owned(uid)` lists; returns how many went."""
    if uid == 0:
        raise ValueError("refusing to remove root's IPC objects")
    objects = owned(uid)
    if not objects:
        return 0
    libc = _libc_handle()
    removed = 0
    for kind, ident in objects:
        if kind == "shm":
            rc = libc.shmctl(ident, IPC_RMID, None)
        elif kind == "sem":
            rc = libc.semctl(ident, 0, IPC_RMID)
        else:
            rc = libc.msgctl(ident, IPC_RMID, None)
        removed += rc == 0
    return removed
