"""Which agent made which nftables fence table, so that a table whose agent died is removed.

An agent removes its table when it stops; one killed outright (SIGKILL, OOM, a crash) cannot, and
its table would stay in the kernel until the next boot: it resets connections from anyone but its
old pool's members to a block of ports the coordinator may give a new TVM on this host, whose own
members would then be shut out. So an agent records itself as its table's owner (a file per table
under /run, which, like the tables, does not outlive a boot: its pid and the process's start time,
so a reused pid is not mistaken for it), and every agent, when it starts, removes the tables of
this network namespace whose owner no longer runs. A table without a record (made by hand, or by
something else that names its tables `tvm_*`) is left alone.

Blocking (files, `nft`): call from a worker thread.
"""

from __future__ import annotations

import contextlib
import os

from .ports import _nft, remove_nft

OWNERS_DIR = "/run/tvm-agent/nft"
PREFIX = "tvm_"


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None when
    no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def record_owner(table: str, directory: str = OWNERS_DIR) -> None:
    """This process owns `table` (before it is made: a crash in between leaves a record of a dead
    owner and no table, which the sweep ignores)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    pid = os.getpid()
    path = os.path.join(directory, table)
    with open(path + ".tmp", "w") as f:
        f.write(f"{pid} {start_time(pid)}\n")
    os.replace(path + ".tmp", path)


def forget_owner(table: str, directory: str = OWNERS_DIR) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, table))


def owner_alive(table: str, directory: str = OWNERS_DIR) -> bool | None:
    """True: its recorded owner runs; False: it ended; None: no (readable) record."""
    try:
        with open(os.path.join(directory, table)) as f:
            pid_text, _, started = f.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return start_time(pid) == started


def list_tables(netns: str | None = None) -> list[str]:
    """Names of the `inet` tables in this (or `netns`'s) network namespace."""
    done = _nft(["list", "tables"], None, netns)
    if done.returncode != 0:
        return []
    names = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] == "inet":
            names.append(parts[2])
    return names


def sweep(directory: str = OWNERS_DIR, netns: str | None = None) -> list[str]:
    """Remove the fence tables whose owner ended; returns their names."""
    removed = []
    for table in list_tables(netns):
        if table.startswith(PREFIX) and owner_alive(table, directory) is False:
            remove_nft(table, netns=netns)
            forget_owner(table, directory)
            removed.append(table)
    return removed
