"""The process sandbox with real processes, cgroups, users and bubblewrap.

Root-only features are skipped with a reason when the host does not offer them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tvmagent import _cgroups
from tvmagent.sandbox import (
    ProcessSpec,
    RunningProcess,
    Sandbox,
    SandboxCapabilities,
    ensure_user,
    prepare_private_dir,
)

PATH = "/usr/local/bin:/usr/bin:/bin"
USER_A = "tvmtest-sbx-a"
USER_B = "tvmtest-sbx-b"


@pytest.fixture(scope="module", autouse=True)
def _remove_test_users() -> Iterator[None]:
    """The users these tests create are deleted afterwards (with their groups): a leftover user's gid
    can later be given to another group and confuse whoever adopts the host's users."""
    import pwd
    import subprocess

    def exists(name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    before = {name for name in (USER_A, USER_B) if exists(name)}
    yield
    for name in (USER_A, USER_B):
        if name not in before and exists(name):
            subprocess.run(["userdel", name], capture_output=True, check=False)
            subprocess.run(["groupdel", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def detected() -> SandboxCapabilities:
    return SandboxCapabilities.detect()


@pytest.fixture(scope="module", params=["clone3", "chain"])
def caps(request: pytest.FixtureRequest, detected: SandboxCapabilities) -> SandboxCapabilities:
    """Every test runs with both launchers: the one-step clone3 one (where it was built) and the
    exec-time wrapper chain that replaces it elsewhere."""
    if request.param == "clone3" and not detected.fast_launch:
        pytest.skip("the clone3 launcher is not built or not usable on this host")
    return dataclasses.replace(detected, fast_launch=request.param == "clone3")


@pytest.fixture
def sandbox(caps: SandboxCapabilities) -> Sandbox:
    return Sandbox(caps, cgroup_prefix=f"tvmtest-{os.getpid()}", kill_grace=1.0)


@pytest.fixture
def no_cgroup_sandbox(caps: SandboxCapabilities) -> Sandbox:
    """The degraded mode of hosts without writable cgroups, forced on this host."""
    bare = SandboxCapabilities(
        cgroup_mode="none",
        can_switch_user=caps.can_switch_user,
        has_bwrap=caps.has_bwrap,
        has_setpriv=caps.has_setpriv,
        has_prlimit=caps.has_prlimit,
        layout=_cgroups.CgroupLayout(),
        tools=caps.tools,
        is_root=caps.is_root,
    )
    return Sandbox(bare, kill_grace=1.0)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir other users can traverse (pytest's tmp_path is 0700 up the chain)."""
    d = tempfile.mkdtemp(prefix="tvm-sbx-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def mkspec(tmp: Path, argv: list[str], **kw: object) -> ProcessSpec:
    base: dict[str, object] = {
        "argv": argv,
        "cwd": str(tmp),
        "env": {"PATH": PATH},
        "stdout_path": str(tmp / "stdout.txt"),
        "stderr_path": str(tmp / "stderr.txt"),
    }
    base.update(kw)
    return ProcessSpec(**base)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    """A process exists and is not a zombie (zombies are dead, only not reaped by init yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a cheap local check (a file the task writes, a cgroup file) until it holds."""
    with trio.fail_after(10):
        for _ in itertools.count():
            if predicate():
                return
            await trio.sleep(0.02)


def _pids_in(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


async def read_pids(path: Path, count: int) -> list[int]:
    """Wait until the task has written ``count`` pids to ``path``."""
    await until(lambda: len(_pids_in(path)) >= count)
    return _pids_in(path)


def session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[3])


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


def require_cgroups(caps: SandboxCapabilities) -> None:
    if not caps.layout.usable:
        pytest.skip("no writable cgroup on this host (needs root and cgroupfs)")


def require_memory_cgroup(caps: SandboxCapabilities) -> None:
    if caps.layout.controller_dir("memory") is None:
        pytest.skip("no writable memory cgroup controller on this host (needs root)")


def require_root_users(caps: SandboxCapabilities) -> None:
    if not caps.can_switch_user:
        pytest.skip("switching users needs root and setpriv")


async def wait_with_deadline(rp: RunningProcess, seconds: float) -> None:
    """What the agent does for maxWallClockTime."""
    with trio.move_on_after(seconds):
        await rp.wait()
    rp.kill()


# ------------------------------------------------------------------ basics


def test_describe_lists_the_host(caps: SandboxCapabilities) -> None:
    lines = caps.describe()
    assert lines
    assert all(isinstance(x, str) and x for x in lines)
    assert caps.cgroup_mode in ("v1", "v2", "none")
    if caps.cgroup_mode == "none":
        assert any("no memory cgroup" in x for x in lines)


async def test_exit_code_output_env_and_cwd(sandbox: Sandbox, tmp_path: Path) -> None:
    script = (
        "import os, sys; print(os.getcwd()); print(sorted(os.environ.items()));"
        " print('oops', file=sys.stderr); sys.exit(7)"
    )
    # LC_ALL set: otherwise Python itself adds LC_CTYPE (PEP 538 locale coercion).
    env = {"PATH": PATH, "LC_ALL": "C.UTF-8", "ALPHA": "1", "SPACES": "a b  c", "EMPTY": ""}
    rp = await sandbox.start(mkspec(tmp_path, [sys.executable, "-c", script], env=env))
    assert rp.pid is not None
    out = await rp.wait()
    assert (out.exit_code, out.reason, out.pid) == (7, "exited", rp.pid)
    assert out.message == "exited with code 7"
    assert out.start_time <= out.end_time
    assert out.start_time.tzinfo is not None
    cwd_line, env_line = (tmp_path / "stdout.txt").read_text().splitlines()
    assert cwd_line == str(tmp_path)
    assert env_line == repr(sorted(env.items()))
    assert (tmp_path / "stderr.txt").read_text() == "oops\n"


async def test_env_exact_through_every_wrapper(sandbox: Sandbox, tmp_path: Path) -> None:
    """Shell-managed and loader variables survive the wrapper chain unchanged, nothing is added."""
    env = {
        "PATH": PATH,
        "PWD": "/not/the/cwd",
        "IFS": "x",
        "OPTIND": "9",
        "PPID": "12345",
        "LD_LIBRARY_PATH": "/nonexistent-lib-dir",
        "HOME": "/h",
    }
    rp = await sandbox.start(mkspec(tmp_path, ["env", "-0"], env=env, nofile_limit=256))
    out = await rp.wait()
    assert out.reason == "exited", out.message
    got = (tmp_path / "stdout.txt").read_bytes().decode().split("\0")
    assert dict(x.split("=", 1) for x in got if x) == env


async def test_output_is_appended(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "stdout.txt").write_text("before\n")
    rp = await sandbox.start(mkspec(tmp_path, ["echo", "after"]))
    assert (await rp.wait()).exit_code == 0
    assert (tmp_path / "stdout.txt").read_text() == "before\nafter\n"


async def test_signal_exit_code(sandbox: Sandbox, tmp_path: Path) -> None:
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", "kill -TERM $$"]))
    out = await rp.wait()
    assert (out.exit_code, out.reason) == (143, "exited")
    assert "SIGTERM" in out.message


async def test_nofile_limit(sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path) -> None:
    if not caps.has_prlimit:
        pytest.skip("prlimit not installed")
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", "ulimit -n"], nofile_limit=77))
    assert (await rp.wait()).exit_code == 0
    assert (tmp_path / "stdout.txt").read_text().strip() == "77"


# ------------------------------------------------------------------ launch failures


async def test_missing_executable(sandbox: Sandbox, tmp_path: Path) -> None:
    rp = await sandbox.start(mkspec(tmp_path, ["no-such-program-xyz", "arg"]))
    assert rp.pid is None
    out = await rp.wait()
    assert (out.exit_code, out.reason, out.pid) == (-1, "launch_failed", None)
    assert "No such file: 'no-such-program-xyz'" in out.message
    rp.kill()  # harmless on a process that never started
    assert (await rp.wait()) == out


async def test_not_executable_and_missing_cwd(sandbox: Sandbox, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    if os.geteuid() != 0:
        out = await (await sandbox.start(mkspec(tmp_path, ["./script.sh"]))).wait()
        assert out.reason == "launch_failed"
        assert "Permission denied" in out.message
    missing = tmp_path / "gone"
    out = await (await sandbox.start(mkspec(tmp_path, ["/bin/true"], cwd=str(missing)))).wait()
    assert out.reason == "launch_failed"
    assert "working directory" in out.message
    assert str(missing) in out.message


async def test_unwritable_output_path(sandbox: Sandbox, tmp_path: Path) -> None:
    spec = mkspec(tmp_path, ["/bin/true"], stdout_path=str(tmp_path / "no" / "dir" / "out"))
    out = await (await sandbox.start(spec)).wait()
    assert out.reason == "launch_failed"
    assert "cannot open output file" in out.message
    assert "No such file or directory" in out.message


async def test_unknown_user(sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path) -> None:
    require_root_users(caps)
    spec = mkspec(tmp_path, ["/bin/true"], run_as="tvm-no-such-user-q")
    out = await (await sandbox.start(spec)).wait()
    assert out.reason == "launch_failed"
    assert out.message == "No such user: 'tvm-no-such-user-q'"


# ------------------------------------------------------------------ killing trees


@pytest.mark.parametrize("mode", ["detected", "no-cgroup"])
async def test_wall_clock_kill_leaves_nothing(
    sandbox: Sandbox, no_cgroup_sandbox: Sandbox, tmp_path: Path, mode: str
) -> None:
    sb = sandbox if mode == "detected" else no_cgroup_sandbox
    pids = tmp_path / "pids"
    cmd = f"sleep 100 & echo $! > {pids}; sleep 100"
    rp = await sb.start(mkspec(tmp_path, ["sh", "-c", cmd]))
    assert rp.pid is not None
    (child,) = await read_pids(pids, 1)
    assert alive(child)
    assert alive(rp.pid)
    await wait_with_deadline(rp, 1.0)
    out = await rp.wait()
    assert out.reason == "killed"
    assert out.exit_code in (128 + 15, 128 + 9)
    assert not alive(rp.pid)
    assert not alive(child)


async def test_setsid_child_is_killed_with_cgroups(
    sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path
) -> None:
    require_cgroups(caps)
    pids = tmp_path / "pids"
    # The escapee leaves the session; then its parent exits, so only the cgroup still knows it.
    cmd = f"(setsid sleep 100 & echo $! > {pids}); sleep 100"
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", cmd]))
    (child,) = await read_pids(pids, 1)
    try:
        # $! is known at the fork, before `setsid` has run: wait until it really left the session.
        await until(lambda: session_of(child) != rp.pid)
    finally:
        await wait_with_deadline(rp, 0.5)
    out = await rp.wait()
    assert out.reason == "killed"
    assert not alive(child)


async def test_leftovers_are_killed_after_main_exits(sandbox: Sandbox, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    rp = await sandbox.start(
        mkspec(tmp_path, ["sh", "-c", f"sleep 100 & echo $! > {pids}; exit 3"])
    )
    out = await rp.wait()
    (child,) = await read_pids(pids, 1)
    assert (out.exit_code, out.reason) == (3, "exited")
    assert "1 leftover process(es) killed" in out.message
    assert not alive(child)


async def test_cancelled_wait_kills_the_tree(sandbox: Sandbox, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The child ignores SIGTERM, so the SIGKILL escalation is needed too.
    cmd = f"sh -c 'trap \"\" TERM; sleep 100' & echo $! > {pids}; sleep 100"
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", cmd]))
    (child,) = await read_pids(pids, 1)
    with trio.move_on_after(0.3) as scope:
        await rp.wait()
    assert scope.cancelled_caught
    assert rp.pid is not None
    assert not alive(rp.pid)
    assert not alive(child)
    out = await rp.wait()
    assert out.reason == "killed"
    assert "SIGKILL" in out.message


async def test_kill_is_idempotent_and_after_exit_keeps_exited(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", "exit 0"]))
    out = await rp.wait()
    rp.kill()
    rp.kill()
    assert (await rp.wait()) == out
    assert out.reason == "exited"


async def test_task_cgroups_are_removed(
    sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path
) -> None:
    require_cgroups(caps)
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", "sleep 100"], name="cg/clean up"))
    assert rp._cgroup is not None
    dirs = list(rp._cgroup.dirs.values())
    assert dirs
    assert all(exists(d) for d in dirs)
    cgroup = rp._cgroup
    await until(lambda: rp.pid in cgroup.pids())  # the wrapper has joined
    assert rp.snapshot_rss() is not None
    await wait_with_deadline(rp, 0.1)
    assert (await rp.wait()).reason == "killed"
    for d in dirs:
        assert not exists(d)
        assert not exists(os.path.dirname(d))  # the empty prefix dir too


async def test_reap_stale_cgroups_of_a_crashed_agent(
    caps: SandboxCapabilities, tmp_path: Path
) -> None:
    require_cgroups(caps)
    prefix = f"tvmtest-stale-{os.getpid()}"
    old = Sandbox(caps, cgroup_prefix=prefix)
    rp = await old.start(mkspec(tmp_path, ["sh", "-c", "sleep 100 & sleep 100"]))
    assert rp._cgroup is not None
    cgroup = rp._cgroup
    await until(lambda: rp.pid in cgroup.pids())
    # A new agent with the same prefix finds the task the "crashed" one left running.
    assert await Sandbox(caps, cgroup_prefix=prefix).reap_stale() == []
    assert not any(exists(d) for d in cgroup.dirs.values())
    out = await rp.wait()
    assert out.exit_code == 137
    assert rp.pid is not None
    assert not alive(rp.pid)


async def test_reused_cgroups_start_clean_and_close_removes_them(
    caps: SandboxCapabilities, tmp_path: Path
) -> None:
    """Issue 10: an agent keeps emptied task cgroups for the next task. A reused one must not leak
    the previous task's oom kills or limits, must still catch a setsid escapee, and `close()`
    removes what is kept."""
    require_memory_cgroup(caps)
    sb = Sandbox(
        caps, cgroup_prefix=f"tvmtest-reuse-{os.getpid()}", kill_grace=1.0, reuse_cgroups=1
    )
    try:
        hog = await sb.start(
            mkspec(tmp_path, [sys.executable, "-c", HOG], memory_limit_bytes=64 << 20)
        )
        first = hog._cgroup
        assert first is not None
        with trio.fail_after(20):
            assert (await hog.wait()).reason == "oom"
        dirs = list(first.dirs.values())
        assert all(exists(d) for d in dirs)  # kept, not removed
        # The next task gets the same cgroup, a larger limit and a zero oom count.
        rp = await sb.start(mkspec(tmp_path, ["sh", "-c", "exit 3"], memory_limit_bytes=128 << 20))
        assert rp._cgroup is first
        mem = (
            first.dirs.get("v2") if "memory" in caps.layout.v2_controllers else first.dirs["memory"]
        )
        limit_file = (
            "memory.max" if "memory" in caps.layout.v2_controllers else "memory.limit_in_bytes"
        )
        assert int(Path(mem, limit_file).read_text()) == 128 << 20
        out = await rp.wait()
        assert (out.reason, out.exit_code) == ("exited", 3), out.message
        assert "memory" not in out.message
        # A setsid escapee in a reused cgroup is still found and killed.
        pidfile = tmp_path / "escapee.pid"
        script = f"setsid sh -c 'echo $$ > {pidfile}; sleep 100' & sleep 100"
        rp = await sb.start(mkspec(tmp_path, ["sh", "-c", script], memory_limit_bytes=128 << 20))
        assert rp._cgroup is first
        (escapee,) = await read_pids(pidfile, 1)
        await wait_with_deadline(rp, 0.2)
        assert (await rp.wait()).reason == "killed"
        assert not alive(escapee)
    finally:
        assert sb.close() == []
    assert not any(exists(d) for d in dirs)


async def test_restart_removes_idle_cgroups_a_killed_agent_kept(
    caps: SandboxCapabilities, tmp_path: Path
) -> None:
    """An agent killed with idle cgroups in its reuse pool leaves them behind; the next agent with
    the same prefix removes the empty ones at start and leaves a cgroup that still has members."""
    require_cgroups(caps)
    prefix = f"tvmtest-leftover-{os.getpid()}"
    old = Sandbox(caps, cgroup_prefix=prefix, kill_grace=1.0, reuse_cgroups=4)
    busy = await old.start(mkspec(tmp_path, ["sleep", "100"]))
    done = await old.start(mkspec(tmp_path, ["true"]))
    await done.wait()
    assert done._cgroup is not None
    assert busy._cgroup is not None
    assert done._cgroup is not busy._cgroup
    idle_dirs = list(done._cgroup.dirs.values())
    busy_cgroup = busy._cgroup
    await until(lambda: busy.pid in busy_cgroup.pids())
    assert all(exists(d) for d in idle_dirs)  # "killed" here: nobody calls old.close()
    Sandbox(caps, cgroup_prefix=prefix).remove_empty_leftovers()
    assert not any(exists(d) for d in idle_dirs)
    assert all(exists(d) for d in busy_cgroup.dirs.values())
    await wait_with_deadline(busy, 0.1)
    assert (await busy.wait()).reason == "killed"
    assert old.close() == []
    assert not any(exists(d) for d in busy_cgroup.dirs.values())


async def test_reused_cgroup_removed_meanwhile_is_recreated(
    caps: SandboxCapabilities, tmp_path: Path
) -> None:
    """Someone (an operator, another agent's start-up clean-up) removed an idle kept cgroup: the
    next task recreates it, limits included, instead of failing to join it."""
    require_memory_cgroup(caps)
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-gone-{os.getpid()}", kill_grace=1.0, reuse_cgroups=1)
    try:
        first = await sb.start(mkspec(tmp_path, ["true"], memory_limit_bytes=64 << 20))
        await first.wait()
        cgroup = first._cgroup
        assert cgroup is not None
        for d in cgroup.dirs.values():
            os.rmdir(d)
        rp = await sb.start(mkspec(tmp_path, ["sh", "-c", "exit 4"], memory_limit_bytes=64 << 20))
        assert rp._cgroup is cgroup
        assert all(exists(d) for d in cgroup.dirs.values())
        mem = (
            cgroup.dirs.get("v2")
            if "memory" in caps.layout.v2_controllers
            else cgroup.dirs["memory"]
        )
        limit_file = (
            "memory.max" if "memory" in caps.layout.v2_controllers else "memory.limit_in_bytes"
        )
        assert int(Path(mem, limit_file).read_text()) == 64 << 20
        out = await rp.wait()
        assert (out.reason, out.exit_code) == ("exited", 4), out.message
    finally:
        assert sb.close() == []


# ------------------------------------------------------------------ limits

HOG = "x = 'a' * (300 << 20); import time; time.sleep(30)"


async def test_memory_hog_is_oom_killed(
    sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path
) -> None:
    require_memory_cgroup(caps)
    spec = mkspec(tmp_path, [sys.executable, "-c", HOG], memory_limit_bytes=64 << 20)
    rp = await sandbox.start(spec)
    with trio.fail_after(20):
        out = await rp.wait()
    assert out.reason == "oom", out.message
    assert out.exit_code == 137
    assert out.message.startswith("killed: out of memory (limit 64 MiB")


async def test_memory_watchdog_without_cgroups(no_cgroup_sandbox: Sandbox, tmp_path: Path) -> None:
    spec = mkspec(tmp_path, [sys.executable, "-c", HOG], memory_limit_bytes=64 << 20)
    rp = await no_cgroup_sandbox.start(spec)
    with trio.fail_after(20):
        out = await rp.wait()
    assert out.reason == "oom", out.message
    assert "RSS watchdog" in out.message


async def test_pids_limit(sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path) -> None:
    if caps.layout.controller_dir("pids") is None:
        pytest.skip("no writable pids cgroup controller on this host (needs root)")
    cmd = "i=0; while [ $i -lt 20 ]; do sleep 30 & i=$((i+1)); done; echo spawned-all"
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", cmd], pids_limit=5))
    out = await rp.wait()
    assert out.exit_code != 0
    assert "fork" in (tmp_path / "stderr.txt").read_text().lower()
    assert "spawned-all" not in (tmp_path / "stdout.txt").read_text()


# ------------------------------------------------------------------ users


async def test_task_user_cannot_read_sibling_dir(
    sandbox: Sandbox, caps: SandboxCapabilities, shared_tmp: Path
) -> None:
    require_root_users(caps)
    uid_a, gid_a = ensure_user(USER_A)
    ensure_user(USER_B)
    assert ensure_user(USER_A) == (uid_a, gid_a)  # idempotent
    dir_a, dir_b = shared_tmp / "a", shared_tmp / "b"
    prepare_private_dir(str(dir_a), USER_A)
    prepare_private_dir(str(dir_b), USER_B)
    st = dir_b.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    (dir_b / "secret.txt").write_text("b's data")
    cmd = f"id -u; id -G; cat {dir_b}/secret.txt"
    rp = await sandbox.start(mkspec(dir_a, ["sh", "-c", cmd], run_as=USER_A, nofile_limit=128))
    out = await rp.wait()
    assert out.reason == "exited"
    assert out.exit_code != 0
    uid_line, groups_line = (dir_a / "stdout.txt").read_text().splitlines()
    assert int(uid_line) == uid_a
    assert groups_line.split() == [str(gid_a)]  # supplementary groups cleared
    assert "Permission denied" in (dir_a / "stderr.txt").read_text()
    assert (dir_a / "stdout.txt").stat().st_uid == uid_a


def test_ensure_user_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="invalid Linux user name"):
        ensure_user("Bad User")
    with pytest.raises(ValueError, match="invalid Linux user name"):
        ensure_user("x" * 40)


# ------------------------------------------------------------------ bubblewrap


def require_bwrap(caps: SandboxCapabilities) -> None:
    if not caps.has_bwrap:
        pytest.skip("bubblewrap not installed (apt-get install bubblewrap)")


async def test_bwrap_isolates(sandbox: Sandbox, caps: SandboxCapabilities, tmp_path: Path) -> None:
    require_bwrap(caps)
    cmd = (
        "echo pid=$$; ls /proc | grep -c '^[0-9]'; touch /usr/tvm-x 2>/dev/null && echo usr-rw;"
        " echo hi > inside.txt && echo task-dir-rw"
    )
    rp = await sandbox.start(mkspec(tmp_path, ["sh", "-c", cmd], use_bwrap=True))
    out = await rp.wait()
    assert out.reason == "exited", (tmp_path / "stderr.txt").read_text()
    lines = (tmp_path / "stdout.txt").read_text().splitlines()
    assert lines[0] in ("pid=1", "pid=2")  # own PID namespace
    assert int(lines[1]) <= 4  # sees only its own processes
    assert "usr-rw" not in lines
    assert "task-dir-rw" in lines
    assert (tmp_path / "inside.txt").read_text() == "hi\n"


async def test_bwrap_as_task_user_and_kill(
    sandbox: Sandbox, caps: SandboxCapabilities, shared_tmp: Path
) -> None:
    require_bwrap(caps)
    require_root_users(caps)
    uid, _ = ensure_user(USER_A)
    d = shared_tmp / "bw"
    prepare_private_dir(str(d), USER_A)
    rp = await sandbox.start(
        mkspec(
            d, ["sh", "-c", "touch made.txt; sleep 100 & sleep 100"], run_as=USER_A, use_bwrap=True
        )
    )
    await until((d / "made.txt").exists)
    assert (d / "made.txt").stat().st_uid == uid  # ownership right outside the sandbox
    await wait_with_deadline(rp, 0.2)
    out = await rp.wait()
    assert out.reason == "killed"
    if rp._cgroup is not None:
        assert not any(exists(x) for x in rp._cgroup.dirs.values())
