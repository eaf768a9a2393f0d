"""The agent's descriptor-confined file API (tvmagent/files.py) over real files: what is served,
what is refused (links anywhere on a path, '..', FIFOs, devices, the agent's own files), listings
that never follow links, and a rename race — with openat2 and with the O_NOFOLLOW walk."""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from protocol import messages as pm
from tvmagent import files

JOB = "job-0000000001"
SECRET = b"root-only secret\n"
MARKER = ".tvm-cleaned"


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2" and not files.openat2_usable():
        pytest.skip("this kernel (or a seccomp filter) has no openat2")
    if request.param == "walk":
        monkeypatch.setattr(files, "_openat2_usable", False)
    return request.param


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A TVM root as the agent lays it out, with the agent's own files beside the served areas."""
    r = tmp_path / "root"
    t1 = r / "tasks" / "wi" / JOB / "t1"
    (t1 / "wd" / "sub").mkdir(parents=True)
    (t1 / "stdout.txt").write_bytes(b"out\n")
    (t1 / "wd" / "digits").write_bytes(b"0123456789")
    (t1 / "wd" / "sub" / "f.txt").write_bytes(b"deep\n")
    t2 = r / "tasks" / "wi" / JOB / "t2"
    t2.mkdir()
    (t2 / "secret").write_bytes(SECRET)
    os.chmod(t2, 0o700)
    (r / "tasks" / "wi" / JOB / "t1.tvm-retention").write_text("123\n")
    (r / "tasks" / "wi" / JOB / f"gone{MARKER}").write_text("")
    for d in ("shared", "start", "cache", "certs"):
        (r / d).mkdir()
    (r / "start" / "stdout.txt").write_bytes(b"started\n")
    (r / "agent-credential").write_bytes(SECRET)
    (r / "agent-id").write_text("agent-x")
    (r / "certs" / "sha1-ab.pfx.pw").write_bytes(SECRET)
    os.chmod(r / "agent-credential", 0o600)
    return r


def ask(root: Path, op: str, path: str, **kw: object) -> pm.FileResponse:
    return files.serve(
        str(root), pm.FileRequest(req_id=7, op=op, path=path, **kw), cleaned_marker=MARKER
    )


def code(root: Path, op: str, path: str, **kw: object) -> str:
    resp = ask(root, op, path, **kw)
    assert resp.error_code, f"{op} {path} was served: {resp}"
    assert resp.message
    assert not resp.data
    assert not resp.entries
    return resp.error_code


def names(resp: pm.FileResponse) -> list[str]:
    assert not resp.error_code, resp
    return [e.name for e in resp.entries]


T1 = f"tasks/wi/{JOB}/t1"


def test_serves_task_files(root: Path, mode: str) -> None:
    resp = ask(root, "read", f"{T1}/wd/digits", offset=2, length=4)
    assert (resp.data, resp.size, resp.req_id) == (b"2345", 10, 7)
    assert ask(root, "read", f"{T1}//./wd/digits").data == b"0123456789"
    st = ask(root, "stat", f"{T1}/stdout.txt")
    assert (st.size, st.mtime) == (4, os.stat(root / T1 / "stdout.txt").st_mtime)
    assert names(ask(root, "list", T1)) == ["wd", "stdout.txt"]
    deep = ask(root, "list", T1, recursive=True)
    assert names(deep) == ["wd", "stdout.txt", "wd/sub", "wd/digits", "wd/sub/f.txt"]
    assert {e.name: e.size for e in deep.entries if not e.is_directory}["wd/sub/f.txt"] == 5
    assert ask(root, "read", "start/stdout.txt").data == b"started\n"
    big = os.urandom(files.MAX_READ + 10)
    (root / T1 / "wd" / "big").write_bytes(big)
    assert ask(root, "read", f"{T1}/wd/big").data == big[: files.MAX_READ]


def test_clear_errors(root: Path, mode: str) -> None:
    assert code(root, "read", f"{T1}/wd/nope") == "FileNotFound"
    assert code(root, "stat", f"{T1}/stdout.txt/x") == "FileNotFound"
    assert code(root, "list", f"{T1}/nope") == "FileNotFound"
    assert code(root, "stat", f"{T1}/wd") == "FileIsDirectory"
    assert code(root, "read", f"tasks/wi/{JOB}") == "FileIsDirectory"
    assert code(root, "list", f"{T1}/stdout.txt") == "NotADirectory"
    assert code(root, "read", f"tasks/wi/{JOB}/nosuchtask/stdout.txt") == "FileNotFound"
    assert code(root, "read", f"tasks/wi/{JOB}/gone/stdout.txt") == "TaskFilesCleanedUp"
    assert code(root, "read", f"{T1}/wd/digits", offset=-1) == "InvalidRange"
    assert code(root, "chmod", f"{T1}/wd/digits") == "UnknownOperation"
    for bad in (
        f"{T1}/../t2/secret",
        "../root/agent-credential",
        f"{T1}/wd/..",
        "/etc/shadow",
        f"{T1}/wd/di\0gits",
    ):
        assert code(root, "read", bad) == "InvalidFilePath", bad
    assert code(root, "read", f"{T1}/" + "x/" * 3000 + "y") == "InvalidFilePath"


def test_symlinks_are_never_followed(root: Path, mode: str) -> None:
    wd = root / T1 / "wd"
    os.symlink(root / "agent-credential", wd / "cred")  # absolute, final component
    os.symlink("../../t2/secret", wd / "rel")  # relative, out of the task
    os.symlink("digits", wd / "inside")  # even one that stays inside
    os.symlink("../../t2", wd / "dirlink")  # a directory link in a middle component
    os.symlink("/etc", wd / "etc")
    for path in ("cred", "rel", "inside", "dirlink/secret", "etc/shadow", "etc/passwd"):
        for op in ("read", "stat"):
            assert code(root, op, f"{T1}/wd/{path}") == "SymbolicLinkNotFollowed", (op, path)
    assert code(root, "list", f"{T1}/wd/dirlink") == "SymbolicLinkNotFollowed"
    assert code(root, "list", f"{T1}/wd/etc", recursive=True) == "SymbolicLinkNotFollowed"
    # A listing shows neither the links nor anything about their targets.
    deep = ask(root, "list", T1, recursive=True)
    assert names(deep) == ["wd", "stdout.txt", "wd/sub", "wd/digits", "wd/sub/f.txt"]
    # The task directory itself swapped for a link (as a root task could) is refused too.
    os.rename(root / "tasks" / "wi" / JOB / "t2", root / "t2-real")
    os.symlink(root / "t2-real", root / "tasks" / "wi" / JOB / "t2")
    assert code(root, "read", f"tasks/wi/{JOB}/t2/secret") == "SymbolicLinkNotFollowed"
    assert f"tasks/wi/{JOB}/t2" not in names(ask(root, "list", "", recursive=True))


def test_fifo_socket_and_device_are_refused_without_hanging(root: Path, mode: str) -> None:
    wd = root / T1 / "wd"
    os.mkfifo(wd / "fifo")
    results: list[str] = []
    reader = threading.Thread(
        target=lambda: results.append(code(root, "read", f"{T1}/wd/fifo")), daemon=True
    )
    reader.start()
    reader.join(30)  # with a blocking open this waits for a writer forever
    assert results == ["NotARegularFile"]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(wd / "sock"))
        assert code(root, "read", f"{T1}/wd/sock") == "NotARegularFile"
    listed = names(ask(root, "list", f"{T1}/wd"))
    assert "fifo" not in listed
    assert "sock" not in listed
    try:
        os.mknod(wd / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    assert code(root, "stat", f"{T1}/wd/null") == "NotARegularFile"
    assert "null" not in names(ask(root, "list", f"{T1}/wd"))


def test_only_the_served_areas(root: Path, mode: str) -> None:
    for path in ("agent-credential", "agent-id", "certs/sha1-ab.pfx.pw", "certs", "cache", "nope"):
        assert code(root, "read", path) == "FilePathForbidden", path
        assert code(root, "list", path) == "FilePathForbidden", path
    # The bookkeeping beside task directories is not a task: not found.
    assert code(root, "read", f"tasks/wi/{JOB}/t1.tvm-retention") == "FileNotFound"
    assert code(root, "list", f"tasks/wi/{JOB}/t1.tvm-retention") == "FileNotFound"
    assert names(ask(root, "list", "")) == ["shared", "start", "tasks"]
    everything = names(ask(root, "list", "", recursive=True))
    assert f"{T1}/wd/sub/f.txt" in everything
    assert "start/stdout.txt" in everything
    assert not [
        n for n in everything if "credential" in n or "certs" in n or "cache" in n or ".tvm-" in n
    ]
    assert names(ask(root, "list", f"tasks/wi/{JOB}")) == ["t1", "t2"]
    assert names(ask(root, "list", "tasks/wi", recursive=True))[:3] == [
        JOB,
        f"{JOB}/t1",
        f"{JOB}/t2",
    ]


def test_listing_bound_and_depth(root: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    many = root / T1 / "wd" / "many"
    many.mkdir()
    for i in range(60):
        (many / f"f{i:02}").write_bytes(b"x")
    monkeypatch.setattr(files, "MAX_ENTRIES", 50)
    assert len(ask(root, "list", f"{T1}/wd/many").entries) == 50
    monkeypatch.undo()
    if mode == "walk":
        monkeypatch.setattr(files, "_openat2_usable", False)
    # Deeper than the agent has fds to hold open at once: each level is reopened from the base.
    deep = root / "shared" / "d"
    path = deep
    for _ in range(300):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "leaf").write_bytes(b"leaf")
    listed = names(ask(root, "list", "shared", recursive=True))
    assert listed[-1] == "d/" * 301 + "leaf"
    assert ask(root, "read", "shared/" + "d/" * 301 + "leaf").data == b"leaf"


def test_hard_link_is_the_tasks_own_inode(root: Path, mode: str) -> None:
    # A hard link is an inode the task already holds (protected_hardlinks stops a task user from
    # linking a file it could not read and write): served like any file of the task.
    os.link(root / T1 / "wd" / "digits", root / T1 / "wd" / "again")
    assert ask(root, "read", f"{T1}/wd/again").data == b"0123456789"


def _rename_exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_exchange_race_never_serves_the_target(root: Path, mode: str) -> None:
    wd = root / T1 / "wd"
    (wd / "file").write_bytes(b"harmless\n")
    os.symlink(root / "agent-credential", wd / "link")
    try:
        _rename_exchange(str(wd / "file"), str(wd / "link"))
        _rename_exchange(str(wd / "file"), str(wd / "link"))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) unavailable here: {exc}")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            _rename_exchange(str(wd / "file"), str(wd / "link"))

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen: set[bytes | str] = set()
    try:
        for _ in range(3000):
            resp = ask(root, "read", f"{T1}/wd/file")
            seen.add(resp.error_code or resp.data)
    finally:
        stop.set()
        swapper.join()
    assert SECRET not in seen
    assert seen <= {b"harmless\n", "SymbolicLinkNotFollowed"}
    assert b"harmless\n" in seen


def test_delete_removes_one_file_and_nothing_else(root: Path, mode: str) -> None:
    t1 = root / "tasks" / "wi" / JOB / "t1"
    assert not ask(root, "delete", f"{T1}/wd/sub/f.txt").error_code
    assert not (t1 / "wd" / "sub" / "f.txt").exists()
    assert not ask(root, "delete", "start/stdout.txt").error_code
    assert not (root / "start" / "stdout.txt").exists()
    # Directories, links, '..', the agent's own files and other areas are refused; nothing changes.
    (t1 / "link").symlink_to(root / "tasks" / "wi" / JOB / "t2" / "secret")
    assert code(root, "delete", f"{T1}/link") == "SymbolicLinkNotFollowed"
    assert (root / "tasks" / "wi" / JOB / "t2" / "secret").read_bytes() == SECRET
    assert (t1 / "link").is_symlink()
    assert code(root, "delete", f"{T1}/wd") == "FileIsDirectory"
    assert code(root, "delete", T1) == "FileIsDirectory"
    assert code(root, "delete", f"tasks/wi/{JOB}") == "FileIsDirectory"
    assert code(root, "delete", f"{T1}/../t2/secret") == "InvalidFilePath"
    assert code(root, "delete", f"{T1}/nope") == "FileNotFound"
    assert code(root, "delete", "certs/x") == "FilePathForbidden"
    assert (t1 / "stdout.txt").read_bytes() == b"out\n"
    assert (t1 / "wd").is_dir()
