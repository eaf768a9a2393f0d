"""What this host cannot enforce, said out loud: each entry is "<code>: <why>", sent to the
coordinator in Hello.degraded and shown on the TVM's record (`degradedModes`), in `tvm status` and
by `tvm up`. Only real findings go here (no switch pretends a feature is missing)."""

from __future__ import annotations

import logging
import os

from . import isolation
from .ports import nft_available
from .sandbox import SandboxCapabilities

log = logging.getLogger("tvm.agent")

ISOLATION_OFF = "isolation-off"
SHARED_TASK_USER = "shared-task-user"
NO_CGROUPS = "no-cgroups"
NO_MEMORY_CGROUP = "no-memory-cgroup"
NO_PIDS_CGROUP = "no-pids-cgroup"
PORTS_UNFENCED = "ports-unfenced"
NO_BUBBLEWRAP = "no-bubblewrap"
ROOT_UNREACHABLE = "tvm-root-unreachable"
PROCESSES_VISIBLE = "processes-visible"


def detect_degraded(
    caps: SandboxCapabilities,
    root: str,
    *,
    isolation_mode: str,
    task_user: str | None,
    per_task_users: bool,
) -> list[str]:
    out: list[str] = []
    if not caps.can_switch_user:
        why = "the agent is not root" if not caps.is_root else "setpriv is not installed"
        out.append(
            f"{ISOLATION_OFF}: {why}; every task runs as the agent's own user and can read its files"
        )
    elif isolation_mode == "none" and not task_user:
        out.append(
            f"{ISOLATION_OFF}: task isolation is configured off (task-isolation = none); tasks run as root"
        )
    elif task_user:
        out.append(
            f"{SHARED_TASK_USER}: every task runs as {task_user}; tasks can read each other's files"
        )
    if per_task_users:
        blocked = isolation.untraversable_parent(root)
        if blocked:
            out.append(
                f"{ROOT_UNREACHABLE}: task users cannot enter {blocked} above the TVM root {root}"
            )
    if caps.can_switch_user and (per_task_users or task_user) and caps.task_mounts is None:
        why = "the clone3 launcher" if not caps.fast_launch else "a mount namespace of their own"
        out.append(
            f"{PROCESSES_VISIBLE}: without {why}, tasks list every user's processes and their"
            " command lines in /proc"
        )
    lay = caps.layout
    if not lay.usable:
        out.append(
            f"{NO_CGROUPS}: no writable cgroup; a task that leaves its session can escape the kill"
        )
    else:
        if lay.controller_dir("memory") is None:
            out.append(
                f"{NO_MEMORY_CGROUP}: memory limits are only checked by a periodic RSS watchdog"
            )
        if lay.controller_dir("pids") is None:
            out.append(f"{NO_PIDS_CGROUP}: no per-task process limit")
    if not (caps.is_root and nft_available()) and not os.environ.get("TVM_AGENT_IP"):
        out.append(f"{PORTS_UNFENCED}: no nftables and no user-space gate; pool ports admit anyone")
    if not caps.has_bwrap:
        out.append(f"{NO_BUBBLEWRAP}: pools that ask for bubblewrap run their tasks without it")
    for line in out:
        log.warning("degraded: %s", line)
    return out
