"""Task users left by earlier runs never wedge an agent: a slot user whose passwd group is gone
(getgrgid fails) is repaired with its own group and runs a real process; one that cannot be
repaired is skipped, said as a degraded mode, and the next slot user serves. Real users and groups
with names unique to this test run, all removed afterwards."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tvmagent import host_health, isolation

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv (real task users)",
)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


class HostNames:
    """Users and groups this test makes, all deleted at the end (users first: a group that is some
    user's primary group cannot go before it)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.prefix = f"tvt{tag}s"  # slot users <prefix>0, <prefix>1, ...
        self.tag = tag
        self.users: list[str] = []
        self.groups: list[str] = []

    def user(self, name: str, *args: str) -> None:
        self.users.append(name)
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *args, name)

    def group(self, name: str, *args: str) -> int:
        self.groups.append(name)
        _run("groupadd", "--system", *args, name)
        return grp.getgrnam(name).gr_gid

    def cleanup(self) -> None:
        for i in range(4):  # slot users the agent may have made itself, and their own groups
            self.users.append(f"{self.prefix}{i}")
            self.groups.append(f"{self.prefix}{i}")
        for name in dict.fromkeys(self.users):
            subprocess.run(["userdel", name], capture_output=True)
        for name in dict.fromkeys(self.groups):
            subprocess.run(["groupdel", "--force", name], capture_output=True)


@pytest.fixture
def names() -> Iterator[HostNames]:
    n = HostNames()
    try:
        yield n
    finally:
        n.cleanup()
        for name in [*n.users, *n.groups]:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                raise AssertionError(f"user {name} left behind")
            with contextlib.suppress(KeyError):
                grp.getgrnam(name)
                raise AssertionError(f"group {name} left behind")


def _gid_as(uid: int, gid: int) -> int:
    out = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "id", "-g"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_a_slot_user_whose_passwd_group_is_gone_gets_its_own_group(
    names: HostNames, tmp_path: object
) -> None:
    slot = f"{names.prefix}0"
    gone = f"tvt{names.tag}g"
    names.group(gone)
    names.user(slot, "--gid", gone)
    _run("groupdel", "--force", gone)  # what an earlier run left: a passwd gid without a group
    with pytest.raises(KeyError):
        grp.getgrgid(pwd.getpwnam(slot).pw_gid)
    users = isolation.SlotUsers(lock_dir=str(tmp_path), prefix=names.prefix, limit=3)
    lease = users.acquire()
    try:
        assert lease.user == slot
        assert grp.getgrgid(lease.gid).gr_name == slot  # its own group, made now
        assert _gid_as(lease.uid, lease.gid) == lease.gid  # a real process runs as it
        assert users.broken == {}
    finally:
        lease.release(clean=True)


def test_a_slot_user_that_cannot_be_repaired_is_skipped_and_reported(
    names: HostNames, tmp_path: object
) -> None:
    slot = f"{names.prefix}0"
    # Its own group exists with a gid another group shares, and is some other user's primary
    # group, so it can be neither used nor replaced; its passwd group does not exist.
    own_gid = names.group(slot)
    names.group(f"tvt{names.tag}t", "--non-unique", "--gid", str(own_gid))
    names.user(f"tvt{names.tag}o", "--gid", slot)
    gone = f"tvt{names.tag}g"
    names.group(gone)
    names.user(slot, "--gid", gone)
    _run("groupdel", "--force", gone)
    users = isolation.SlotUsers(lock_dir=str(tmp_path), prefix=names.prefix, limit=3)
    lease = users.acquire()
    try:
        assert lease.user == f"{names.prefix}1"  # the next one serves
        assert _gid_as(lease.uid, lease.gid) == lease.gid
        assert set(users.broken) == {slot}
        assert "does not exist" in users.broken[slot]
        health = host_health.HostHealth()
        host_health.runtime_degraded(health, None, users)
        (mode,) = health.degraded_modes() or []
        assert mode.startswith(f"broken-task-user: {slot} skipped: task user {slot}: ")
    finally:
        lease.release(clean=True)


def test_no_usable_slot_user_is_a_clear_error(names: HostNames, tmp_path: object) -> None:
    users = isolation.SlotUsers(lock_dir=str(tmp_path), prefix=names.prefix, limit=1)
    users.broken[f"{names.prefix}0"] = "task user broken for this test"
    users._broken_at[f"{names.prefix}0"] = time.monotonic()  # just found broken
    with pytest.raises(OSError, match="no usable task user on this host: 1 broken"):
        users.acquire()
