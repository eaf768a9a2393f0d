"""The per-uid sweep that runs before a slot user is handed to another task: it removes what the uid
owns where every user may write, never follows a link, and makes a directory it cannot empty
unusable to the uid. Runs on a private tree with a uid no process uses (root only: chown)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import pytest

from tvmagent import _ipc_sweep, _keyrings
from tvmagent._uid_sweep import cleanup_uid, deny_schedulers, kill_uid, sweep_uid, sweep_uids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another uid)")

UID = 3_000_000 + os.getpid() % 100_000  # no such user: nothing else owns files as it
OTHER = UID + 1


def _make(path, uid: int, mode: int = 0o600, data: bytes = b"secret") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    os.lchown(path, uid, uid)


def test_sweep_removes_the_uids_files_and_nothing_else(tmp_path) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    os.chmod(root, 0o1777)
    outside = tmp_path / "outside.txt"
    _make(outside, OTHER)
    _make(root / "left.bin", UID)
    _make(root / "keep.bin", OTHER)
    os.symlink(outside, root / "link")  # a link of the uid to someone else's file
    os.lchown(root / "link", UID, UID)
    own = root / "own.d" / "deeper"
    own.mkdir(parents=True)
    _make(own / "f", UID)
    for d in (root / "own.d", own):
        os.chown(d, UID, UID)
    shared = root / "shared.d"  # someone else's world-writable directory
    shared.mkdir()
    os.chmod(shared, 0o1777)
    os.chown(shared, OTHER, OTHER)
    _make(shared / "left", UID)
    _make(shared / "theirs", OTHER)

    removed = sweep_uid(UID, (str(root),))

    assert sorted(os.listdir(root)) == ["keep.bin", "shared.d"]
    assert os.listdir(shared) == ["theirs"]
    assert outside.read_bytes() == b"secret"  # the link went, not its target
    assert removed == 6  # left.bin, link, own.d/deeper/f, deeper, own.d, shared.d/left


def test_a_directory_of_the_uid_that_cannot_be_emptied_is_closed_to_it(tmp_path) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    os.chmod(root, 0o1777)
    d = root / "mine"
    d.mkdir(mode=0o777)
    os.chown(d, UID, UID)
    _make(d / "theirs", OTHER)  # another uid's file inside: not the sweep's to delete
    sweep_uid(UID, (str(root),))
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert os.listdir(d) == ["theirs"]


def test_root_is_refused() -> None:
    with pytest.raises(ValueError, match="root"):
        sweep_uid(0, ("/nonexistent",))
    with pytest.raises(ValueError, match="root"):
        kill_uid(0, 0)


def test_kill_uid_ends_a_process_that_left_its_session() -> None:
    import subprocess

    proc = subprocess.Popen(
        ["sleep", "600"], user=UID, group=UID, extra_groups=[], start_new_session=True
    )
    try:
        kill_uid(UID, UID)
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


IPCMK_KINDS = ("-M 4096", "-S 1", "-Q")  # ipcmk's options: a segment, a semaphore, a queue


def _ipcmk(uid: int, option: str) -> None:
    """One System V IPC object made by `uid` (0600)."""
    subprocess.run(
        ["ipcmk", *option.split(), "-p", "0600"],
        user=uid,
        group=uid,
        extra_groups=[],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@pytest.mark.skipif(not shutil.which("ipcmk"), reason="ipcmk (util-linux) not installed")
def test_system_v_ipc_objects_of_the_uid_are_removed_and_no_others() -> None:
    def make(uid: int) -> None:
        for option in IPCMK_KINDS:
            _ipcmk(uid, option)

    try:
        make(UID)
        make(OTHER)
        assert sorted(k for k, _ in _ipc_sweep.owned(UID)) == ["msg", "sem", "shm"]
        assert cleanup_uid(UID, UID, kill=False, roots=()) == 3
        assert _ipc_sweep.owned(UID) == []
        assert len(_ipc_sweep.owned(OTHER)) == 3  # someone else's stay
    finally:
        for uid in (UID, OTHER):
            _ipc_sweep.remove_owned(uid)
    assert _ipc_sweep.owned(OTHER) == []
    with pytest.raises(ValueError, match="root"):
        _ipc_sweep.remove_owned(0)


def _tables_have_rows() -> bool:
    def rows(kind: str) -> int:
        with open(f"/proc/sysvipc/{kind}") as f:
            return len(f.read().splitlines()) - 1

    return any(rows(kind) for kind in ("shm", "sem", "msg"))


@pytest.mark.skipif(not shutil.which("ipcmk"), reason="ipcmk (util-linux) not installed")
@pytest.mark.parametrize(
    ("option", "kind"), list(zip(IPCMK_KINDS, ("shm", "sem", "msg"), strict=True))
)
def test_the_quick_look_sees_each_kind_of_ipc_object(option: str, kind: str) -> None:
    """`owned` reads the tables only when the *_INFO calls say objects exist: each kind must count."""
    assert _ipc_sweep.any_exist() == _tables_have_rows()  # whatever else runs on this host
    try:
        _ipcmk(UID, option)
        assert _ipc_sweep.any_exist()
        assert [k for k, _ in _ipc_sweep.owned(UID)] == [kind]
    finally:
        _ipc_sweep.remove_owned(UID)
    assert _ipc_sweep.owned(UID) == []
    assert _ipc_sweep.any_exist() == _tables_have_rows()


def test_one_walk_sweeps_several_uids_and_no_others(tmp_path) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    os.chmod(root, 0o1777)
    third = UID + 2
    for uid in (UID, third, OTHER):
        _make(root / f"f{uid}", uid)
    mine = root / "dir-of-third"
    mine.mkdir()
    os.chown(mine, third, third)
    _make(mine / "inside", third)
    assert sweep_uids(frozenset({UID, third}), (str(root),)) == 4
    assert os.listdir(root) == [f"f{OTHER}"]
    with pytest.raises(ValueError, match="root"):
        sweep_uids(frozenset({UID, 0}), (str(root),))
    assert os.listdir(root) == [f"f{OTHER}"]


def test_work_a_uid_scheduled_for_later_is_swept(tmp_path) -> None:
    """A crontab, an at job or a mailbox (files of the uid directly in the spools) goes with its
    files; the spool's own directories and other users' entries stay."""
    crontabs, atjobs, mail = tmp_path / "crontabs", tmp_path / "atjobs", tmp_path / "mail"
    for d in (crontabs, atjobs, mail):
        d.mkdir()
    _make(mail / "tvmslot7", UID)  # a mailbox: a task can mail itself
    _make(crontabs / "tvmslot7", UID)
    _make(crontabs / "someone", OTHER)
    _make(atjobs / "a0001a01", UID)
    (atjobs / ".SEQ").write_text("1")
    sub = crontabs / "sub"
    sub.mkdir()
    os.chown(sub, UID, UID)
    spools = (str(crontabs), str(atjobs), str(mail), str(tmp_path / "absent"))
    assert sweep_uids(frozenset({UID}), (), spools) == 3
    assert os.listdir(mail) == []
    assert sorted(os.listdir(crontabs)) == ["someone", "sub"]
    assert os.listdir(atjobs) == [".SEQ"]


def test_task_users_are_named_in_the_schedulers_deny_files(tmp_path) -> None:
    cron, at = tmp_path / "cron.deny", tmp_path / "at.deny"
    at.write_text("daemon")  # an operator's file without a final newline
    old = os.umask(0o077)  # an agent started by `tvm up` has the coordinator's
    try:
        for name in ("tvmslot0", "tvmslot1", "tvmslot0"):
            deny_schedulers(name, (str(cron), str(at)))
    finally:
        os.umask(old)
    assert cron.read_text() == "tvmslot0\ntvmslot1\n"
    assert at.read_text() == "daemon\ntvmslot0\ntvmslot1\n"
    assert stat.S_IMODE(os.stat(cron).st_mode) == 0o644  # crontab and at read it without root


async def test_sweeps_asked_during_a_walk_share_the_next_one(tmp_path) -> None:
    """Each uid is swept by a walk that started after it asked; the ones that asked while a walk
    ran share the next walk instead of one walk each."""
    import trio

    from tvmagent.sweeps import Sweeps

    root = tmp_path / "tmp"
    root.mkdir()
    os.chmod(root, 0o1777)
    uids = [UID, UID + 2, UID + 3]
    for uid in [*uids, OTHER]:
        _make(root / f"f{uid}", uid)
    refreshed = []
    sweeps = Sweeps(lambda: False, lambda: refreshed.append(True), roots=(str(root),))

    class User:
        def __init__(self, uid: int) -> None:
            self.uid, self.gid = uid, uid

    async def one(uid: int) -> None:
        await sweeps.sweep(User(uid))
        assert not (root / f"f{uid}").exists()  # gone by the time its sweep returns

    async with trio.open_nursery() as n:
        for uid in uids:
            n.start_soon(one, uid)
    assert sweeps.walks == 2  # the first alone, the two that asked meanwhile together
    assert len(refreshed) == 2
    assert os.listdir(root) == [f"f{OTHER}"]


KEY_SCRIPT = """
import ctypes, platform, sys
add_key, keyctl = {"aarch64": (217, 219)}.get(platform.machine(), (248, 250))
libc = ctypes.CDLL(None, use_errno=True)
ring = -4  # the user keyring; "persistent": the uid's persistent keyring, kept for days
if sys.argv[2:] == ["persistent"]:
    assert libc.syscall(keyctl, 1, None) > 0  # a session keyring of its own to link it into
    ring = libc.syscall(keyctl, 22, -1, -3)
    assert ring > 0, ctypes.get_errno()
if sys.argv[1] == "put":
    assert libc.syscall(add_key, b"user", b"tvm-test", b"secret", 6, ring) > 0
else:
    print("found" if libc.syscall(keyctl, 10, ring, b"user", b"tvm-test", 0) > 0 else "absent")
"""


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
@pytest.mark.skipif(_keyrings._clear is None, reason="needs the agent's compiled helper")
def test_a_uids_keyrings_are_emptied_once_used() -> None:
    """A key a task user stored in its user keyring outlives its processes; the sweep empties the
    keyring when /proc/key-users shows a change since the last time, and only then."""

    def as_uid(*args: str) -> str:
        return subprocess.run(
            ["/usr/bin/python3", "-c", KEY_SCRIPT, *args],
            user=UID,
            group=UID,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    as_uid("put")
    assert as_uid("get") == "found"  # a later process of the uid: the key is still there
    assert _keyrings.used(UID)
    assert _keyrings.clear_if_used(UID, UID) is True
    assert as_uid("get") == "absent"
    # Unused since, the uid stops being cleared (once the kernel has collected the unlinked key,
    # which it does shortly after the clear: the counts may move once more).
    # On a busy host that collection can come later: wait until the counts stay still a while.
    quiet = 0
    for _ in range(100):
        quiet = 0 if _keyrings.clear_if_used(UID, UID) else quiet + 1
        if quiet == 5:
            break
        time.sleep(0.1)
    assert not _keyrings.used(UID)
    as_uid("get")  # looking adds no key
    assert not _keyrings.used(UID)
    as_uid("put")
    assert _keyrings.used(UID)
    assert _keyrings.clear_if_used(UID, UID) is True
    as_uid("put", "persistent")
    assert as_uid("get", "persistent") == "found"
    assert _keyrings.clear_if_used(UID, UID) is True
    assert as_uid("get", "persistent") == "absent"
    with pytest.raises(ValueError, match="root"):
        _keyrings._clear(0, 0)


def test_key_user_counts_are_read_for_the_uid_asked(tmp_path) -> None:
    path = tmp_path / "key-users"
    path.write_text(
        "    0:    10 9/9 3/1000000 192/25000000\n"
        "  999:     3 3/3 3/200 44/20000\n"
        " 1999:     2 2/2 2/200 28/20000\n"
        "3021612:     3 3/3 2/200 30/20000\n"
    )
    assert _keyrings._counts(999, str(path)) == b"3/3 3/200 44/20000"
    assert _keyrings._counts(1999, str(path)) == b"2/2 2/200 28/20000"  # not 999's
    assert _keyrings._counts(3021612, str(path)) == b"3/3 2/200 30/20000"
    assert _keyrings._counts(0, str(path)) == b"9/9 3/1000000 192/25000000"
    assert _keyrings._counts(99, str(path)) is None
    assert _keyrings._counts(999, str(tmp_path / "absent")) is None
