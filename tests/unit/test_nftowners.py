"""Who owns a fence table: the record an agent leaves, and how a dead owner is told from a live
one (a reused pid is not the same process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tvmagent import nftowners


def test_a_live_owner_is_alive(tmp_path: Path) -> None:
    nftowners.record_owner("tvm_a", str(tmp_path))
    assert nftowners.owner_alive("tvm_a", str(tmp_path)) is True
    assert oct(os.stat(tmp_path).st_mode & 0o777) != "0o777"
    nftowners.forget_owner("tvm_a", str(tmp_path))
    nftowners.forget_owner("tvm_a", str(tmp_path))  # twice: no error
    assert nftowners.owner_alive("tvm_a", str(tmp_path)) is None


def test_an_ended_owner_and_a_reused_pid_are_dead(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    started = nftowners.start_time(child.pid)
    assert started is not None
    (tmp_path / "tvm_gone").write_text(f"{child.pid} {started}\n")
    assert nftowners.owner_alive("tvm_gone", str(tmp_path)) is True
    child.communicate(b"")
    assert nftowners.owner_alive("tvm_gone", str(tmp_path)) is False
    # Our own pid, but another process's start time: a pid the kernel gave out again.
    (tmp_path / "tvm_reused").write_text(f"{os.getpid()} 1\n")
    assert nftowners.owner_alive("tvm_reused", str(tmp_path)) is False


def test_an_unreadable_record_says_nothing(tmp_path: Path) -> None:
    (tmp_path / "tvm_garbage").write_text("not a pid\n")
    assert nftowners.owner_alive("tvm_garbage", str(tmp_path)) is None
    assert nftowners.owner_alive("tvm_missing", str(tmp_path)) is None


def test_the_start_time_reads_past_a_command_name_with_spaces_and_parentheses(tmp_path) -> None:
    script = tmp_path / "a (b) c"
    script.write_text("import sys; sys.stdin.read()\n")
    os.symlink(sys.executable, tmp_path / "py (x) y")
    child = subprocess.Popen([str(tmp_path / "py (x) y"), str(script)], stdin=subprocess.PIPE)
    try:
        with open(f"/proc/{child.pid}/stat") as f:
            assert "(" in f.read().split(" ", 2)[1]
        started = nftowners.start_time(child.pid)
        assert started is not None
        assert started.isdigit()
        assert started == nftowners.start_time(child.pid)
    finally:
        child.communicate(b"")
