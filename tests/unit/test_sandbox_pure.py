"""Pure parts of the sandbox: parsing, tree selection, command building, validation."""

from __future__ import annotations

import os
import stat

import pytest

from tvmagent import _cgroups
from tvmagent._users import prepare_private_dir, validate_user_name
from tvmagent.procspec import (
    LaunchError,
    ProcessSpec,
    ProcInfo,
    SandboxCapabilities,
    build_command,
    bwrap_args,
    exit_code_of,
    format_bytes,
    parse_stat,
    resolve_executable,
    select_tree,
    split_env,
)
from tvmagent.sandbox import Sandbox

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
"""
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
0::/
"""

TOOLS = {"sh": "/bin/sh", "env": "/usr/bin/env", "setpriv": "/usr/bin/setpriv",
         "prlimit": "/usr/bin/prlimit", "bwrap": "/usr/bin/bwrap"}  # fmt: skip


def spec(**kw: object) -> ProcessSpec:
    base: dict[str, object] = {
        "argv": ["prog", "a b"],
        "cwd": "/tmp",
        "env": {"PATH": "/usr/bin"},
        "stdout_path": "/tmp/o",
        "stderr_path": "/tmp/e",
    }
    base.update(kw)
    return ProcessSpec(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ cgroup parsing


def test_hybrid_layout_dirs() -> None:
    mounts = _cgroups.parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.fstype for m in mounts] == ["cgroup", "cgroup", "cgroup", "cgroup2"]
    v2, v1 = _cgroups.parse_proc_cgroup(HYBRID_PROC_CGROUP)
    assert v2 == "/"
    assert v1["memory"] == "/process_api/abc"
    v2_dir, v1_dirs = _cgroups.own_dirs(mounts, v2, v1)
    assert v2_dir == "/sys/fs/cgroup/unified"
    assert v1_dirs == {
        "memory": "/sys/fs/cgroup/memory/process_api/abc",
        "pids": "/sys/fs/cgroup/pids",
    }


def test_pure_v2_layout_with_subtree_mount() -> None:
    text = "30 23 0:26 /user.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    mounts = _cgroups.parse_mountinfo(text)
    v2_dir, v1_dirs = _cgroups.own_dirs(mounts, "/user.slice/agent.service", {})
    assert v2_dir == "/sys/fs/cgroup/agent.service"
    assert v1_dirs == {}


def test_mountinfo_escapes_and_junk() -> None:
    text = "41 31 0:38 / /sys/fs/cg\\040x rw - cgroup2 cgroup2 rw\nnot a line\n"
    (m,) = _cgroups.parse_mountinfo(text)
    assert m.mountpoint == "/sys/fs/cg x"


def test_layout_mode() -> None:
    assert _cgroups.CgroupLayout().mode == "none"
    assert not _cgroups.CgroupLayout().usable
    lay = _cgroups.CgroupLayout(v2_base="/x", v1_bases={"memory": "/m"})
    assert lay.mode == "v1"
    assert lay.controller_dir("memory") == "/m"
    assert lay.controller_dir("pids") is None
    lay2 = _cgroups.CgroupLayout(v2_base="/x", v2_controllers=frozenset({"memory"}))
    assert lay2.mode == "v2"
    assert lay2.controller_dir("memory") == "/x"


def test_sanitize_name() -> None:
    assert _cgroups.sanitize_name("job/1 task:2") == "job_1_task_2"
    assert _cgroups.sanitize_name("..") == "task"
    assert _cgroups.sanitize_name("") == "task"
    assert len(_cgroups.sanitize_name("x" * 500)) == 40


def test_parse_flat_keyed() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\nbad line here\n"
    assert _cgroups.parse_flat_keyed(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}


# ------------------------------------------------------------------ /proc


def test_parse_stat_with_odd_comm() -> None:
    text = "4242 (we ird) (x)) S 1 4240 4240 0 -1 4194560 " + " ".join(["0"] * 14) + " 777 0\n"
    p = parse_stat(text)
    assert (p.pid, p.state, p.ppid, p.pgid, p.sid) == (4242, "S", 1, 4240, 4240)
    assert p.rss_pages == 777


def test_select_tree() -> None:
    procs = [
        ProcInfo(100, 1, 100, 100, "S"),  # root
        ProcInfo(101, 100, 100, 100, "S"),  # child
        ProcInfo(102, 100, 102, 102, "S"),  # setsid child: found through ppid
        ProcInfo(103, 102, 102, 102, "S"),  # its child
        ProcInfo(104, 1, 104, 100, "S"),  # orphan in our session
        ProcInfo(105, 1, 105, 105, "S"),  # stranger
        ProcInfo(106, 100, 100, 100, "Z"),  # zombie: dead already
        ProcInfo(50, 1, 100, 100, "S"),  # the agent itself, excluded
    ]
    assert select_tree(procs, 100, exclude=50) == {100, 101, 102, 103, 104}
    # Root reaped: its children are re-parented to init, and the setsid one is out of reach
    # (why cgroups are needed for that case).
    after = [
        ProcInfo(p.pid, 1 if p.ppid == 100 else p.ppid, p.pgid, p.sid, p.state)
        for p in procs
        if p.pid != 100
    ]
    assert select_tree(after, 100, exclude=50, include_root=False) == {101, 104}


# ------------------------------------------------------------------ command building


def test_resolve_executable(tmp_path: os.PathLike[str]) -> None:
    d = str(tmp_path)
    exe = os.path.join(d, "bin", "tool")
    os.makedirs(os.path.dirname(exe))
    with open(exe, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    assert resolve_executable("tool", f"/nonexistent:{d}/bin", "/") == exe
    assert resolve_executable("bin/tool", None, d) == exe  # relative to the task's cwd
    assert resolve_executable("tool", "bin", d) == exe  # relative PATH entry, from cwd
    with pytest.raises(LaunchError, match="No such file: 'nope' not found in PATH=/x"):
        resolve_executable("nope", "/x", "/")
    with pytest.raises(LaunchError, match="No such file: './nope'"):
        resolve_executable("./nope", None, d)
    with pytest.raises(LaunchError, match="Is a directory"):
        resolve_executable("./bin", None, d)
    os.chmod(exe, 0o644)
    if os.geteuid() != 0:  # root may execute-check differently; the rule is the same
        with pytest.raises(LaunchError, match="Permission denied"):
            resolve_executable("tool", f"{d}/bin", "/")


def test_split_env_holds_shell_and_loader_vars() -> None:
    env = {"PATH": "/bin", "PWD": "/w", "IFS": ":", "LD_PRELOAD": "x.so", "A": "1"}
    spawn, held = split_env(env, wrapped=True)
    assert spawn == {"PATH": "/bin", "A": "1"}
    assert held == {"PWD": "/w", "IFS": ":", "LD_PRELOAD": "x.so"}
    assert split_env(env, wrapped=False) == (env, {})


def test_build_command_direct() -> None:
    plan = build_command(spec(), "/usr/bin/prog", TOOLS, [], None, None)
    assert plan.argv == ["prog", "a b"]
    assert plan.executable == "/usr/bin/prog"
    assert plan.env == {"PATH": "/usr/bin"}


def test_build_command_full_chain_order() -> None:
    s = spec(nofile_limit=64, env={"PATH": "/usr/bin", "LD_PRELOAD": "/x.so", "PWD": "/p"})
    bw = ["/usr/bin/bwrap", "--x", "--"]
    plan = build_command(s, "/usr/bin/prog", TOOLS, ["/cg/a/cgroup.procs", "/cg/b/cgroup.procs"],
                         (1001, 1002), bw)  # fmt: skip
    argv = plan.argv
    # sh (cgroup join, as root) -> prlimit -> setpriv -> env (restores held vars) -> bwrap -> prog
    assert argv[0] == "/bin/sh"
    assert argv[3:7] == ["sh", "2", "/cg/a/cgroup.procs", "/cg/b/cgroup.procs"]
    i_pl = argv.index("/usr/bin/prlimit")
    i_sp = argv.index("/usr/bin/setpriv")
    i_env = argv.index("/usr/bin/env")
    i_bw = argv.index("/usr/bin/bwrap")
    assert 6 < i_pl < i_sp < i_env < i_bw
    assert argv[i_pl + 1] == "--nofile=64:64"
    assert argv[i_sp + 1 : i_sp + 6] == [
        "--reuid=1001",
        "--regid=1002",
        "--clear-groups",
        "--no-new-privs",
        "--",
    ]
    assert argv[i_env + 1 : i_env + 4] == ["--", "LD_PRELOAD=/x.so", "PWD=/p"]
    assert argv[-2:] == ["/usr/bin/prog", "a b"]
    assert plan.env == {"PATH": "/usr/bin"}  # loader vars never reach the root-run wrappers
    assert plan.executable == "/bin/sh"


def test_build_command_gives_exactly_the_supplementary_groups_asked_for() -> None:
    plan = build_command(spec(), "/usr/bin/prog", TOOLS, [], (1001, 1002), None, groups=(2001,))
    i_sp = plan.argv.index("/usr/bin/setpriv")
    assert plan.argv[i_sp + 1 : i_sp + 6] == [
        "--reuid=1001",
        "--regid=1002",
        "--groups=2001",
        "--no-new-privs",
        "--",
    ]


def test_bwrap_args() -> None:
    args = bwrap_args("/usr/bin/bwrap", "/t", ["/shared"], ["/certs"],
                      {"/bin": "usr/bin", "/etc": None})  # fmt: skip
    joined = " ".join(args)
    assert "--symlink usr/bin /bin" in joined
    assert "--ro-bind /etc /etc" in joined
    assert "--ro-bind /certs /certs" in joined
    assert "--bind /t /t --bind /shared /shared --chdir /t --" in joined
    assert "--unshare-pid" in args
    assert "--die-with-parent" in args


def test_exit_codes_and_sizes() -> None:
    assert exit_code_of(3) == 3
    assert exit_code_of(-9) == 137
    assert exit_code_of(-15) == 143
    assert format_bytes(64 << 20) == "64 MiB"
    assert format_bytes(2 << 30) == "2 GiB"
    assert format_bytes(1000) == "1000 bytes"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"argv": []}, "argv must be a non-empty list"),
        ({"argv": [""]}, "argv\\[0\\]"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"argv": "ls"}, "argv must be a non-empty list"),
        ({"cwd": "rel/dir"}, "cwd must be an absolute path"),
        ({"env": {"A=B": "1"}}, "invalid environment variable name"),
        ({"env": {"A": 1}}, "must be a string"),
        ({"env": [("A", "1")]}, "env must be a dict"),
        ({"stdout_path": ""}, "stdout_path"),
        ({"run_as": "Root User"}, "invalid Linux user name"),
        ({"memory_limit_bytes": 0}, "memory_limit_bytes must be a positive int"),
        ({"pids_limit": -1}, "pids_limit"),
        ({"nofile_limit": True}, "nofile_limit"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"gid": -1}, "group ids must be ints"),
        ({"groups": (5, "tvmtasks")}, "group ids must be ints"),
        ({"use_bwrap": True, "bwrap_writable": ("rel",)}, "bwrap paths must be absolute"),
    ],
)
def test_process_spec_rejects_bad_input(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        spec(**kw)


@pytest.mark.parametrize("name", ["tvm-pool1", "_svc", "a", "a" * 32, "user_1-x"])
def test_valid_user_names(name: str) -> None:
    assert validate_user_name(name) == name


@pytest.mark.parametrize("name", ["", "Root", "1user", "a" * 33, "a b", "-x", "x/y", "x:y", None])
def test_invalid_user_names(name: object) -> None:
    with pytest.raises(ValueError, match="user name"):
        validate_user_name(name)


def test_prepare_private_dir_bad_input(tmp_path: os.PathLike[str]) -> None:
    d = os.path.join(str(tmp_path), "a", "b")
    with pytest.raises(ValueError, match="invalid mode"):
        prepare_private_dir(d, None, mode=0o77777)
    with pytest.raises(ValueError, match="unknown user"):
        prepare_private_dir(d, "tvm-no-such-user-xyz")
    with pytest.raises(ValueError, match="invalid Linux user name"):
        prepare_private_dir(d, "Bad Name")
    with pytest.raises(ValueError, match="non-empty"):
        prepare_private_dir("", None)
    assert not os.path.exists(d)
    prepare_private_dir(d, None, 0o700)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_sandbox_rejects_bad_prefix_and_grace() -> None:
    caps = SandboxCapabilities("none", False, False, False, False)
    with pytest.raises(ValueError, match="cgroup_prefix"):
        Sandbox(caps, cgroup_prefix="a/b")
    with pytest.raises(ValueError, match="cgroup_prefix"):
        Sandbox(caps, cgroup_prefix="")
    with pytest.raises(ValueError, match="kill_grace"):
        Sandbox(caps, kill_grace=-1)


def test_describe_says_what_degrades() -> None:
    caps = SandboxCapabilities("none", False, False, False, False, is_root=False)
    text = "\n".join(caps.describe())
    assert "no writable cgroup" in text
    assert "RSS watchdog" in text
    assert "process limit falls back to RLIMIT_NPROC" in text
    assert "nofile limits are NOT enforced" in text
    assert "agent is not root" in text
    assert "bwrap not found" in text
    full = SandboxCapabilities(
        "v1", True, True, True, True, is_root=True, tools={"bwrap": "/usr/bin/bwrap"},
        layout=_cgroups.CgroupLayout(v2_base="/u", v2_has_kill=True,
                                     v1_bases={"memory": "/m", "pids": "/p"}),
    )  # fmt: skip
    text = "\n".join(full.describe())
    assert "cgroup.kill" in text
    assert "cgroup v1 memory controller at /m" in text
    assert "NOT enforced" not in text
    assert "cannot switch user" not in text


def test_build_command_nproc_fallback_goes_through_prlimit_before_the_user_switch() -> None:
    plan = build_command(spec(), "/usr/bin/prog", TOOLS, [], (1001, 1002), None, 64)
    i_pl = plan.argv.index("/usr/bin/prlimit")
    assert plan.argv[i_pl + 1 : i_pl + 3] == ["--nproc=64:64", "--"]
    assert i_pl < plan.argv.index("/usr/bin/setpriv")
    assert (
        "/usr/bin/prlimit"
        not in build_command(spec(), "/usr/bin/prog", TOOLS, [], (1001, 1002), None).argv
    )


def test_evolve_checks_what_changes_and_nothing_else_may_change() -> None:
    from tvmagent.procspec import ProcessSpec

    spec = ProcessSpec(argv=["-"], cwd="/tmp", env={"A": "1"}, stdout_path="/o", stderr_path="/e")
    run = spec.evolve(argv=["true", "x"], run_as="tvmslot3", gid=5, groups=(7,))
    assert (run.argv, run.run_as, run.gid, run.groups) == (["true", "x"], "tvmslot3", 5, (7,))
    assert spec.argv == ["-"]
    assert spec.run_as is None
    with pytest.raises(ValueError, match="argv"):
        spec.evolve(argv=[])
    with pytest.raises(ValueError, match="group ids"):
        spec.evolve(groups=(-1,))
    with pytest.raises(ValueError):
        spec.evolve(run_as="bad name")
    with pytest.raises(ValueError, match="evolve"):
        spec.evolve(cwd="relative")


def test_build_command_puts_ignored_signals_back_to_default_with_env() -> None:
    tools = {**TOOLS, "env-reset": TOOLS["env"]}
    plan = build_command(spec(), "/usr/bin/prog", tools, [], (1001, 1002), None, reset_signals=True)
    i_env = plan.argv.index("/usr/bin/env")
    assert plan.argv[i_env + 1 : i_env + 3] == ["--default-signal", "--"]
    assert plan.argv[-2:] == ["/usr/bin/prog", "a b"]
    # Nothing ignored, or an env without --default-signal: no extra step.
    assert "/usr/bin/env" not in build_command(spec(), "/usr/bin/prog", tools, [], None, None).argv
    plain = build_command(spec(), "/usr/bin/prog", TOOLS, [], None, None, reset_signals=True)
    assert "/usr/bin/env" not in plain.argv
