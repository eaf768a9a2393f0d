"""The `processes-visible` degraded mode: said where tasks run as other users but cannot be given a
private /proc, and only there."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tvmagent.degraded import PROCESSES_VISIBLE, detect_degraded
from tvmagent.sandbox import SandboxCapabilities


def _caps(**kw: object) -> SandboxCapabilities:
    base: dict[str, Any] = {
        "cgroup_mode": "v2",
        "can_switch_user": True,
        "has_bwrap": True,
        "has_setpriv": True,
        "has_prlimit": True,
        "is_root": True,
        "fast_launch": True,
    }
    base.update(kw)
    return SandboxCapabilities(**base)


def _visible(caps: SandboxCapabilities, root: str, **kw: Any) -> list[str]:
    args: dict[str, Any] = {"isolation_mode": "users", "task_user": None, "per_task_users": True}
    args.update(kw)
    lines = detect_degraded(caps, root, **args)
    return [line for line in lines if line.startswith(PROCESSES_VISIBLE + ":")]


@pytest.mark.parametrize(
    ("caps", "why"),
    [
        ({"task_mounts": None}, "a mount namespace of their own"),
        ({"task_mounts": None, "fast_launch": False}, "the clone3 launcher"),
    ],
)
def test_said_where_tasks_of_other_users_see_every_process(tmp_path, caps, why) -> None:
    lines = _visible(_caps(**caps), str(tmp_path))
    assert len(lines) == 1, lines
    assert f"without {why}" in lines[0]
    # a shared --task-user too: its tasks are still not the only processes of the host
    assert _visible(_caps(**caps), str(tmp_path), per_task_users=False, task_user="batch")


def test_not_said_where_tasks_have_a_private_proc_or_run_as_the_agent(tmp_path) -> None:
    mounts = cast(Any, object())  # only its presence is read
    assert _visible(_caps(task_mounts=mounts), str(tmp_path)) == []
    # not root: isolation-off already says every task is the agent's user
    assert _visible(_caps(can_switch_user=False), str(tmp_path)) == []
