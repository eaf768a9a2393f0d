"""The tasks' mount namespace (tvmagent/launch/mntns.py) with real processes and mounts: a task
started into it as another user sees only its own processes; the host's /proc is untouched; a
mount made on the host after the namespace reaches the next tasks; a bad descriptor is a clear
launch error naming the step."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tvmagent.launch import mntns
from tvmagent.launch import spawn as fast

NOBODY = (65534, 65534, ())

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and user switches need root"),
    pytest.mark.skipif(not fast.fast_available(), reason="the clone3 launcher is not built here"),
]


def run(
    argv: list[str], mntns_fd: int, ids: tuple[int, int, tuple[int, ...]] | None = NOBODY
) -> str:
    """Run `argv` through the launcher to its end; its output (stdout and stderr)."""
    r, w = os.pipe()
    null, w2 = os.open(os.devnull, os.O_RDONLY), os.dup(w)
    try:
        child = fast.spawn(
            argv[0], argv, {"PATH": "/usr/bin:/bin"}, "/", (null, w, w2),
            ids=ids, mntns_fd=mntns_fd,
        )  # fmt: skip
    except BaseException:
        os.close(r)
        raise
    finally:
        for fd in (null, w, w2):
            os.close(fd)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert child.wait_blocking() == 0, out
    return out


LIST = ["/bin/sh", "-c", "ls /proc | grep -c '^[0-9]'; ls -d /proc/1 2>/dev/null || echo no-init"]


@pytest.fixture
def mounts() -> Iterator[mntns.TaskMounts]:
    try:
        tm = mntns.TaskMounts()
    except OSError as e:
        pytest.skip(f"this host refuses a mount namespace: {e}")
    yield tm
    tm.close()


def test_a_task_user_sees_only_its_own_processes(mounts: mntns.TaskMounts) -> None:
    hidden = run(LIST, mounts.fd()).split()
    assert hidden[1] == "no-init", hidden
    assert int(hidden[0]) <= 4, hidden  # sh, ls, grep
    shown = run(LIST, -1).split()  # the same user outside: init and the rest of the host
    assert shown[1] == "/proc/1", shown
    assert int(shown[0]) > 10, shown
    # The namespace's /proc never reached the host's mount table.
    with open("/proc/self/mountinfo") as f:
        assert "hidepid" not in f.read()


def test_a_mount_made_later_on_the_host_reaches_the_next_tasks(mounts: mntns.TaskMounts) -> None:
    before = mounts.fd()
    assert mounts.fd() == before  # nothing changed: the same namespace
    where = tempfile.mkdtemp(prefix="tvm-mnt-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tvmtest", where], check=True)
    try:
        after = mounts.fd()
        assert after != before  # a changed table: a fresh namespace, at once
        show = ["/bin/sh", "-c", f"grep -c ' {where} ' /proc/self/mountinfo || true"]
        assert run(show, after).strip() == "1"
        assert run(show, before).strip() in ("0", "1")  # the old one still opens (shared hosts: 1)
        assert mounts.fd() == after
    finally:
        subprocess.run(["umount", where], check=False)
        os.rmdir(where)


def test_a_host_umount_is_let_go_of_without_a_task_start(
    mounts: mntns.TaskMounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace holds what was mounted when it was made: after the host's umount, the agent's
    tick makes a fresh one and closes the old one (RETIRE_S later), so the disk is not kept busy."""
    where = tempfile.mkdtemp(prefix="tvm-mnt-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tvmtest", where], check=True)
    try:
        holding = mounts.fd()  # the namespace holding the tmpfs
        subprocess.run(["umount", where], check=True)
        monkeypatch.setattr(mntns, "RETIRE_S", 0.0)
        mounts.tick()
        assert mounts._fd != holding  # made anew without a task start
        assert mounts._retired == []  # and the one made before the umount closed
        show = ["/bin/sh", "-c", f"grep -c ' {where} ' /proc/self/mountinfo || true"]
        assert run(show, mounts.fd()).strip() == "0"  # what tasks enter now holds it no more
    finally:
        subprocess.run(["umount", where], check=False, capture_output=True)
        os.rmdir(where)


def test_a_descriptor_that_is_no_namespace_names_the_step() -> None:
    with open(os.devnull) as f, pytest.raises(fast.SpawnError) as e:
        run(["/bin/true"], f.fileno())
    assert "cannot enter the tasks' mount namespace" in str(e.value)
