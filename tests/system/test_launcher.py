"""The task launchers (the one-step clone3 launcher and the exec-time wrapper chain) with real
processes, cgroups and users: what a task is confined by from its first exec, and the kernel's
cgroup.kill pitfall."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tvmagent.launch import place
from tvmagent.sandbox import ProcessSpec, RunningProcess, Sandbox, SandboxCapabilities

PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.fixture(scope="module")
def detected() -> SandboxCapabilities:
    return SandboxCapabilities.detect()


@pytest.fixture(scope="module", params=["clone3-thread", "clone3-loop", "chain"])
def caps(
    request: pytest.FixtureRequest, detected: SandboxCapabilities
) -> Iterator[SandboxCapabilities]:
    """The clone3 launcher cloning in its thread and on the event loop (launch/place.py), and the
    wrapper chain."""
    fast = request.param.startswith("clone3")
    if fast and not detected.fast_launch:
        pytest.skip("the clone3 launcher is not built or not usable on this host")
    if not detected.layout.usable or detected.layout.controller_dir("memory") is None:
        pytest.skip("needs writable cgroups with a memory controller (root and cgroupfs)")
    if not detected.can_switch_user:
        pytest.skip("switching users needs root")
    before = os.environ.get(place.ENV)
    os.environ[place.ENV] = request.param.partition("-")[2] or "auto"
    try:
        yield dataclasses.replace(detected, fast_launch=fast)
    finally:
        if before is None:
            os.environ.pop(place.ENV, None)
        else:
            os.environ[place.ENV] = before


@pytest.fixture(scope="module")
def task_user() -> Iterator[tuple[str, int, int]]:
    """A user of its own for these tests, deleted (with its group) afterwards."""
    name = f"tvmtl{os.getpid() % 100000}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    pw = pwd.getpwnam(name)
    try:
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is 0700 up the chain)."""
    d = tempfile.mkdtemp(prefix="tvm-launch-", dir="/tmp")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def spec(wd: Path, argv: list[str], **kw: object) -> ProcessSpec:
    base: dict[str, object] = {
        "argv": argv,
        "cwd": str(wd),
        "env": {"PATH": PATH},
        "stdout_path": str(wd / "stdout.txt"),
        "stderr_path": str(wd / "stderr.txt"),
        "memory_limit_bytes": 256 << 20,
        "pids_limit": 64,
    }
    base.update(kw)
    return ProcessSpec(**base)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("inline", [False, True], ids=["thread", "loop"])
async def test_task_is_confined_from_its_first_exec(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path, inline: bool
) -> None:
    """What the task's program sees the moment it runs: its own cgroups (v2 and the v1 limit
    controllers), its user and groups, no signal ignored, no descriptor of the agent."""
    name, uid, gid = task_user
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l1-{os.getpid()}", kill_grace=1.0)
    script = "cat /proc/self/cgroup; id -u; id -G; grep SigIgn /proc/self/status; ls /proc/self/fd"
    rp = await sb.start(
        spec(workdir, ["sh", "-c", script], run_as=name, gid=gid, groups=(gid,)), inline=inline
    )
    assert rp._cgroup is not None
    cg = rp._cgroup
    out = await rp.wait()
    text = (workdir / "stdout.txt").read_text()
    assert out.exit_code == 0, (workdir / "stderr.txt").read_text()
    lines = text.splitlines()
    cgroup_lines = {
        ln.split(":", 2)[1]: ln.split(":", 2)[2] for ln in lines if ln[:1].isdigit() and ":" in ln
    }
    leaf = os.path.basename(next(iter(cg.dirs.values())))
    if "v2" in cg.dirs:
        assert cgroup_lines[""].endswith(leaf)
    for key in cg.dirs:
        if key != "v2":
            assert cgroup_lines[key].endswith(leaf), (key, cgroup_lines)
    assert str(uid) in lines
    assert f"{gid}" in lines
    assert "SigIgn:\t0000000000000000" in lines
    fds = lines[lines.index("SigIgn:\t0000000000000000") + 1 :]
    assert sorted(fds) == ["0", "1", "2", "3"]  # 3: ls's own directory


async def test_fork_at_once_and_setsid_escapee_die_with_the_task(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path
) -> None:
    name, _uid, gid = task_user
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l2-{os.getpid()}", kill_grace=0.5)
    script = "setsid sleep 300 & echo $! > pids; sleep 300 & echo $! >> pids; exit 0"
    rp = await sb.start(spec(workdir, ["sh", "-c", script], run_as=name, gid=gid))
    out = await rp.wait()
    assert out.exit_code == 0
    pids = [int(p) for p in (workdir / "pids").read_text().split()]
    assert len(pids) == 2
    assert not any(alive(p) for p in pids)
    assert "2 leftover process(es) killed" in out.message


async def test_a_killed_cgroup_is_never_reused(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path
) -> None:
    """On kernel 6.18 a process cloned into a cgroup after its cgroup.kill was written is killed
    at birth: the tasks after a SIGKILLed one must all run (and never in that cgroup)."""
    if not caps.layout.v2_has_kill:
        pytest.skip("no cgroup.kill on this kernel")
    name, _uid, gid = task_user
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l3-{os.getpid()}", kill_grace=0.2, reuse_cgroups=4)
    try:
        stubborn = await sb.start(
            spec(
                workdir, ["sh", "-c", "trap '' TERM; echo up > up; sleep 300"], run_as=name, gid=gid
            )
        )
        with trio.fail_after(10):
            while not (workdir / "up").exists():  # noqa: ASYNC110 - a file the task writes
                await trio.sleep(0.01)
        stubborn.kill()
        out = await stubborn.wait()
        assert out.reason == "killed"
        assert "SIGKILL" in out.message
        killed = stubborn._cgroup
        assert killed is not None
        assert killed.killed
        for i in range(4):
            rp = await sb.start(spec(workdir, ["sh", "-c", f"exit {i}"], run_as=name, gid=gid))
            assert rp._cgroup is not killed
            assert (await rp.wait()).exit_code == i
        assert not any(os.path.exists(d) for d in killed.dirs.values())
    finally:
        assert sb.close() == []


async def test_launch_failures_name_the_step_and_the_next_task_runs(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path
) -> None:
    name, _uid, gid = task_user
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l4-{os.getpid()}", kill_grace=0.5)
    closed = workdir / "closed"
    closed.mkdir(mode=0o700)  # root's: the task user may not enter it
    bad = await sb.start(
        dataclasses.replace(spec(workdir, ["true"], run_as=name, gid=gid), cwd=str(closed))
    )
    out = await bad.wait()
    # The chain enters the directory as root before it drops privileges; the clone3 launcher
    # enters it as the task's user, which is the rule the task dirs are built for.
    if caps.fast_launch:
        assert out.reason == "launch_failed"
        assert "cannot enter the working directory" in out.message
        assert "Permission denied" in out.message
    rp = await sb.start(spec(workdir, ["sh", "-c", "echo fine"], run_as=name, gid=gid))
    assert (await rp.wait()).exit_code == 0
    assert (workdir / "stdout.txt").read_text().strip().endswith("fine")


def test_the_launcher_is_built_where_a_compiler_exists() -> None:
    """A broken build must not pass unnoticed as the (slower) wrapper chain."""
    import platform
    import sysconfig

    from tvmagent.launch import spawn as fast

    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if not (shutil.which("cc") and headers and platform.machine() == "x86_64"):
        pytest.skip("no C compiler, no Python headers or not x86_64: the wrapper chain is expected")
    assert fast._clone3 is not None, "the clone3 launcher was not built although it could be"
    assert fast._clone3.AVAILABLE


async def test_a_refused_clone3_falls_back_to_the_chain(
    detected: SandboxCapabilities, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where clone3 is refused at run time (a container's seccomp filter answers ENOSYS), the task
    still runs, through the wrapper chain, and so do the ones after it."""
    import errno

    from tvmagent.launch import spawn as fast

    if not detected.fast_launch:
        pytest.skip("the clone3 launcher is not in use on this host")
    calls = []

    def refused(*args: object, **kw: object) -> object:
        calls.append(args)
        raise fast.SpawnError("clone3 is not supported by this kernel", errno.ENOSYS, 0)

    monkeypatch.setattr(fast, "spawn", refused)
    caps = dataclasses.replace(detected)
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l5-{os.getpid()}", kill_grace=0.5)
    for i in range(2):
        rp = await sb.start(spec(workdir, ["sh", "-c", f"exit {i}"]), inline=i == 0)
        assert (await rp.wait()).exit_code == i
    assert len(calls) == 1
    assert not caps.fast_launch


async def test_tasks_run_on_when_the_launcher_thread_dies(
    detected: SandboxCapabilities,
    task_user: tuple[str, int, int],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The launcher thread starts tasks and watches them for their end. Should it end (a bug),
    the tasks it watched are still seen to end, with their exit codes, and the next start gets a
    new thread; nothing waits forever."""
    if not detected.fast_launch:
        pytest.skip("the clone3 launcher is not in use on this host")
    if not detected.layout.usable or not detected.can_switch_user:
        pytest.skip("needs writable cgroups and root")
    name, _uid, gid = task_user
    monkeypatch.setenv(place.ENV, "thread")
    sb = Sandbox(
        dataclasses.replace(detected), cgroup_prefix=f"tvmtest-l6-{os.getpid()}", kill_grace=0.5
    )
    try:
        running = await sb.start(
            spec(workdir, ["sh", "-c", "sleep 0.5; exit 7"], run_as=name, gid=gid), inline=True
        )
        launcher = sb._clones
        first = launcher._thread
        assert first is not None
        assert first.is_alive()
        real_poll = launcher._poll
        broken = []

        def poll_once_broken(ep: object, timeout: float) -> list[tuple[int, int]]:
            if not broken:
                broken.append(True)
                raise RuntimeError("the launcher thread breaks")
            return real_poll(ep, timeout)  # type: ignore[arg-type]

        monkeypatch.setattr(launcher, "_poll", poll_once_broken)
        codes: dict[str, int] = {}

        async def wait_for(label: str, rp: RunningProcess) -> None:
            codes[label] = (await rp.wait()).exit_code

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(wait_for, "running", running)  # waiting before the thread breaks
                await trio.sleep(0.05)
                # This start wakes the thread: it runs the start, then breaks in its next poll.
                quick = await sb.start(
                    spec(workdir, ["sh", "-c", "exit 3"], run_as=name, gid=gid), inline=True
                )
                n.start_soon(wait_for, "quick", quick)
            assert not first.is_alive()
            assert codes == {"running": 7, "quick": 3}
            after = await sb.start(
                spec(workdir, ["sh", "-c", "exit 0"], run_as=name, gid=gid), inline=True
            )
            assert (await after.wait()).exit_code == 0
        assert broken == [True]
        assert launcher._thread is not first
        assert launcher._thread is not None
        assert launcher._thread.is_alive()
    finally:
        assert sb.close() == []


async def test_signals_the_agent_ignores_are_not_passed_on(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path
) -> None:
    """An agent started under nohup (SIGHUP ignored) or in the background by a script (SIGINT,
    SIGQUIT): its tasks still get every signal's default action."""
    name, _uid, gid = task_user
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-l4-{os.getpid()}", kill_grace=1.0)
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        rp = await sb.start(
            spec(workdir, ["sh", "-c", "grep SigIgn /proc/self/status"], run_as=name, gid=gid)
        )
        out = await rp.wait()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert out.exit_code == 0, (workdir / "stderr.txt").read_text()
    assert (workdir / "stdout.txt").read_text().split() == ["SigIgn:", "0000000000000000"]


async def test_the_clone_runs_where_the_setting_says(
    detected: SandboxCapabilities,
    task_user: tuple[str, int, int],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`loop`: the event loop clones and waits for the end itself, no launcher thread is made;
    `thread`: the launcher thread clones. Either way the task runs confined and is waited for."""
    if not detected.fast_launch:
        pytest.skip("the clone3 launcher is not in use on this host")
    if not detected.layout.usable or not detected.can_switch_user:
        pytest.skip("needs writable cgroups and root")
    name, _uid, gid = task_user
    for mode, thread_used in (("loop", False), ("thread", True)):
        monkeypatch.setenv(place.ENV, mode)
        sb = Sandbox(
            dataclasses.replace(detected), cgroup_prefix=f"tvmtest-l7-{os.getpid()}", kill_grace=0.5
        )
        try:
            rp = await sb.start(
                spec(workdir, ["sh", "-c", "id -u; exit 5"], run_as=name, gid=gid), inline=True
            )
            with trio.fail_after(10):
                assert (await rp.wait()).exit_code == 5
            assert (workdir / "stdout.txt").read_text().split()[-1] == str(_uid)
            assert (sb._clones._thread is not None) == thread_used, mode
        finally:
            assert sb.close() == []


async def test_no_exec_of_a_task_gains_privileges(
    caps: SandboxCapabilities, task_user: tuple[str, int, int], workdir: Path
) -> None:
    """A setuid file the task can reach (one a task of its pool left in shared/, owned by a slot
    user that may run another tenant's task by then) does not change the task's user: the task
    runs with no_new_privs. Here a copy of `id`, setuid to `nobody`."""
    name, uid, gid = task_user
    tool = workdir / "suid-id"
    shutil.copy("/usr/bin/id", tool)
    os.chown(tool, 65534, 65534)
    os.chmod(tool, 0o4755)
    # The check is real: the same file run without the sandbox does take nobody's uid.
    plain = subprocess.run(  # noqa: ASYNC221 - a short child before the sandbox starts
        [str(tool), "-u"], user=uid, group=gid, extra_groups=[], capture_output=True, text=True
    )
    assert plain.stdout.strip() == "65534", plain
    sb = Sandbox(caps, cgroup_prefix=f"tvmtest-nnp-{os.getpid()}", kill_grace=1.0)
    rp = await sb.start(
        spec(
            workdir,
            ["sh", "-c", f"{tool} -u; grep NoNewPrivs /proc/self/status"],
            run_as=name,
            gid=gid,
            groups=(gid,),
        )
    )
    out = await rp.wait()
    assert out.exit_code == 0, (workdir / "stderr.txt").read_text()
    assert (workdir / "stdout.txt").read_text().split() == [str(uid), "NoNewPrivs:", "1"]
