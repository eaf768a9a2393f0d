"""Issue 3, the `tvm` CLI as subprocesses against a real coordinator with real agents: every
resource command, `--output json` parses, `task wait` exits non-zero on failures and shows progress
on stderr, missing or wrong credentials give a clear message and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner

from coordinator.cli import cli
from tests.harness import agent_env, cluster_ctx

JOB = "job-0000000001"
TVM = [sys.executable, "-m", "coordinator.cli"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    env.update(extra or {})
    env["COLUMNS"] = "200"
    return env


async def tvm(
    *args: str, env: dict[str, str], stdin: bytes = b"", ok: bool = True
) -> subprocess.CompletedProcess:
    r = await trio.run_process(
        [*TVM, *args], env=env, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    if ok:
        assert r.returncode == 0, (args, r.returncode, r.stdout.decode(), r.stderr.decode())
    return r


async def tvm_json(*args: str, env: dict[str, str], stdin: bytes = b"", ok: bool = True) -> Any:
    r = await tvm(*args, "--output", "json", env=env, stdin=stdin, ok=ok)
    return json.loads(r.stdout)


async def together(*calls: Any) -> list[Any]:
    """Run independent CLI invocations concurrently (each one is a Python start-up)."""
    out: list[Any] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        out[i] = await call

    async with trio.open_nursery() as n:
        for i, call in enumerate(calls):
            n.start_soon(one, i, call)
    return out


# ---------------------------------------------------------------------------- help


def _walk(group: click.Group, path: list[str]):
    for name, cmd in group.commands.items():
        yield [*path, name]
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, [*path, name])


async def test_help_of_root_and_every_group_as_subprocesses():
    env = _env()
    root = await tvm("--help", env=env)
    out = root.stdout.decode()
    for group in ("pool", "tvm", "workitem", "job", "task", "file", "up", "coordinator", "agent"):
        assert group in out
    groups = [n for n, c in cli.commands.items() if isinstance(c, click.Group)]
    assert {"pool", "tvm", "workitem", "job", "task", "file", "agent"} <= set(groups)
    for g in groups:
        r = await tvm(g, "--help", env=env)
        assert r.stdout.decode().startswith(f"Usage: tvm {g} "), r.stdout


@pytest.mark.parametrize("path", list(_walk(cli, [])), ids=lambda p: " ".join(p))
def test_help_of_every_command(path):
    r = CliRunner().invoke(cli, [*path, "--help"], prog_name="tvm")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Usage: tvm " + " ".join(path))


def test_every_resource_command_offers_output_json():
    missing = []
    for path in _walk(cli, []):
        if path[0] in ("up", "quickstart", "coordinator", "agent"):
            continue
        cmd: Any = cli
        for p in path:
            cmd = cmd.commands[p]
        if isinstance(cmd, click.Group) or path == [
            "file",
            "get",
        ]:  # file get writes the file's bytes
            continue
        if path == ["k8s", "manifests"]:  # its output is the manifests themselves (JSON)
            continue
        if "output" not in {p.name for p in cmd.params}:
            missing.append(" ".join(path))
    assert missing == [], (
        f"issue 3 asks for --output json on every command; these lack it: {missing}"
    )


# ---------------------------------------------------------------------------- credentials


async def test_missing_credentials_clear_message_and_exit_code(tmp_path):
    r = await tvm("pool", "list", env=_env(), ok=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    for var in ("TVM_ENDPOINT", "TVM_ACCOUNT", "TVM_KEY"):
        assert var in err
    assert "Traceback" not in err
    r = await tvm(
        "pool",
        "list",
        env=_env({"TVM_ENDPOINT": "http://127.0.0.1:9", "TVM_ACCOUNT": "a"}),
        ok=False,
    )
    assert r.returncode != 0
    assert "TVM_KEY" in r.stderr.decode()
    assert "TVM_ENDPOINT" not in r.stderr.decode()
    for bad in ("localhost:7070", "http://[::1", "http://127.0.0.1:99999"):
        r = await tvm(
            "pool",
            "list",
            env=_env({"TVM_ENDPOINT": bad, "TVM_ACCOUNT": "a", "TVM_KEY": "aGVsbG8="}),
            ok=False,
        )
        assert r.returncode == 1
        assert "endpoint" in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()
    # A key cut short or mistyped: said before any request, not a base64 traceback.
    for bad in ("abc", "not base64!", "aGVsbG8"):
        r = await tvm(
            "pool",
            "list",
            env=_env({"TVM_ENDPOINT": "http://127.0.0.1:9", "TVM_ACCOUNT": "a", "TVM_KEY": bad}),
            ok=False,
        )
        assert r.returncode == 1
        assert "the account key is not base64" in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()
    # Nothing listens there: a clear connection error, not a traceback.
    r = await tvm(
        "pool",
        "list",
        env=_env({"TVM_ENDPOINT": "http://127.0.0.1:9", "TVM_ACCOUNT": "a", "TVM_KEY": "aGVsbG8="}),
        ok=False,
    )
    assert r.returncode == 1
    assert "ConnectionFailed" in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()


def test_every_text_option_refuses_an_empty_value():
    """`--recurrence "$X"` with X unset must not quietly mean "no schedule": every text option
    refuses "" before any request, but those whose default is "" (a prefix) and the credentials
    (empty: from the environment)."""
    checked = []
    for path in _walk(cli, []):
        cmd: Any = cli
        for name in path:
            cmd = cmd.commands[name]
        if isinstance(cmd, click.Group):
            continue
        for p in cmd.params:
            if (
                isinstance(p, click.Option)
                and not p.is_flag
                and p.type.name == "text"
                and p.default != ""
                and p.name not in ("endpoint", "account", "key")
            ):
                with pytest.raises(click.BadParameter, match="must not be empty"):
                    p.type.convert("", p, None)
                with pytest.raises(click.BadParameter, match="must not be empty"):
                    p.type.convert("  ", p, None)
                checked.append(f"{' '.join(path)} {p.opts[0]}")
    assert "workitem add --recurrence" in checked
    assert len(checked) > 50
    creds = ["--endpoint", "http://127.0.0.1:9", "--account", "a", "--key", "aGVsbG8="]
    for args in (
        ["workitem", "add", "w", "--pool", "p", "--recurrence", ""],
        ["pool", "add", "p", "--start-task", ""],
        ["task", "add", "w", JOB, "t", "true", "--max-wall-clock", ""],
    ):
        r = CliRunner().invoke(cli, [*args, *creds])
        assert r.exit_code == 2, r.output  # a usage error: nothing was sent (nothing listens)
        assert "must not be empty" in r.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["up", "--port", "99999"], "99999 is not in the range 0<=x<=65535"),
        (["up", "--port", "-5"], "-5 is not in the range"),
        (["up", "--heartbeat-timeout", "0"], "is not in the range x>0"),
        (["up", "--heartbeat-timeout", "-3"], "is not in the range x>0"),
        (["up", "--log-level", "loud"], "'loud' is not one of"),
        (["up", "--agents", "-1"], "-1 is not in the range x>=0"),
        (["quickstart", "--agents", "0"], "0 is not in the range x>=1"),
        (["quickstart", "--tasks", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_values_for_the_embedded_commands_are_usage_errors(args, says, tmp_path):
    """Were a traceback (a port out of range, a negative timeout) or quietly taken (a log level);
    refused before anything starts or is written."""
    r = CliRunner().invoke(cli, [*args, "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 2, r.output
    assert says in r.output
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("-1", "-1.0 is not in the range x>=0"),
        ("nan", "is not a number of seconds"),
        ("soon", "'soon' is not a valid number of seconds"),
    ],
)
def test_task_wait_refuses_a_timeout_that_is_no_duration(value, says):
    """-1 was taken as 0 (a timeout at once), nan as no limit."""
    creds = ["--endpoint", "http://127.0.0.1:9", "--account", "a", "--key", "aGVsbG8="]
    r = CliRunner().invoke(cli, ["task", "wait", "wi", JOB, "--timeout", value, *creds])
    assert r.exit_code == 2, r.output  # a usage error: nothing was sent (nothing listens)
    assert says in r.output


@pytest.mark.parametrize(
    "args",
    [
        ["add", "wi", JOB, "t1", "true"],
        ["add-many", "wi", JOB],
        ["add-array", "wi", JOB, "--range", "1-3", "true"],
    ],
)
def test_malformed_env_refused_by_every_task_adding_command(args):
    # Nothing listens at the endpoint: a usage error (2), not ConnectionFailed (1), shows the
    # option was refused before anything was sent.
    creds = ["--endpoint", "http://127.0.0.1:9", "--account", "a", "--key", "aGVsbG8="]
    r = CliRunner().invoke(
        cli, ["task", *args, "--env", "NOEQUALS", *creds], input="true\n", prog_name="tvm"
    )
    assert r.exit_code == 2, r.output
    assert "Invalid value for --env: 'NOEQUALS' is not NAME=VALUE" in r.output


# ---------------------------------------------------------------------------- everything against a cluster


PRINT_ENV = "import os; print(os.environ['WATASK_TASK_NAME'], os.environ.get('GREETING', ''))"


async def test_cli_end_to_end(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=5) as c:
        env = _env(
            {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        )

        # Wrong key: the service's code, exit 1, no traceback.
        bad = dict(env, TVM_KEY="d3Jvbmc=")
        r = await tvm("pool", "list", env=bad, ok=False)
        assert r.returncode == 1
        assert "AuthenticationFailed" in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()

        # Pools and TVMs.
        p = await tvm_json(
            "pool",
            "add",
            "p",
            "--target",
            "1",
            "--max-tasks-per-vm",
            "2",
            "--vm-size",
            "medium",
            "--fill",
            "pack",
            env=env,
        )
        assert (p["name"], p["maxTasksPerVM"], p["tvmFillType"]) == ("p", 2, "pack")
        await c.wait_for(lambda: c._idle("p", 1), what="an idle TVM")
        plist, ptable, pshow, tvms, tvm_table, missing = await together(
            tvm_json("pool", "list", env=env),
            tvm("pool", "list", env=env),
            tvm_json("pool", "show", "p", env=env),
            tvm_json("tvm", "list", "p", env=env),
            tvm("tvm", "list", "p", env=env),
            tvm("pool", "show", "nope", env=env, ok=False),
        )
        assert [x["name"] for x in plist] == ["p"]
        assert "p" in ptable.stdout.decode()  # table
        assert pshow["targetDedicated"] == 1
        assert len(tvms) == 1
        assert tvms[0]["state"] in ("idle", "running")
        assert tvms[0]["name"] in tvm_table.stdout.decode()
        assert missing.returncode == 1
        assert "PoolNotFound" in missing.stderr.decode()

        # Workitems and jobs.
        wi = await tvm_json("workitem", "add", "wi", "--pool", "p", "--priority", "5", env=env)
        assert wi["name"] == "wi"
        wlist, wshow, jlist, jtable, jshow = await together(
            tvm_json("workitem", "list", env=env),
            tvm_json("workitem", "show", "wi", env=env),
            tvm_json("job", "list", "wi", env=env),
            tvm("job", "list", "wi", env=env),
            tvm_json("job", "show", "wi", JOB, env=env),
        )
        assert [w["name"] for w in wlist] == ["wi"]
        assert wshow["priority"] == 5
        assert [j["name"] for j in jlist] == [JOB]
        assert JOB in jtable.stdout.decode()
        assert jshow["state"] == "active"

        # Tasks: one by one and many from stdin (plain lines and JSON lines).
        cmd = f'{sys.executable} -c "{PRINT_ENV}"'
        assert await tvm_json(
            "task", "add", "wi", JOB, "t1", cmd, "--env", "GREETING=hello", env=env
        ) == {"added": "t1"}
        lines = "\n".join(
            [
                cmd,
                f'{sys.executable} -c "import sys; sys.exit(3)"',
                json.dumps({"name": "fromjson", "commandLine": cmd}),
            ]
        ).encode()
        results = await tvm_json(
            "task", "add-many", "wi", JOB, "--prefix", "m", env=env, stdin=lines
        )
        assert [(x["name"], x["status"]) for x in results] == [
            ("m-000000", "success"),
            ("m-000001", "success"),
            ("fromjson", "success"),
        ]
        # A refused task in add-many: per-task error on stderr and a non-zero exit code.
        r, r2 = await together(
            tvm(
                "task",
                "add-many",
                "wi",
                JOB,
                "--prefix",
                "m",
                env=env,
                stdin=cmd.encode(),
                ok=False,
            ),
            tvm(
                "task",
                "add",
                "wi",
                JOB,
                "t9",
                "true",
                "--env",
                "WATASK_TASK_NAME=x",
                env=env,
                ok=False,
            ),
        )
        assert r.returncode == 1
        assert "TaskExists" in r.stderr.decode()
        assert r2.returncode == 1
        assert "ReservedEnvironmentVariable" in r2.stderr.decode()

        # Wait: shows progress on stderr and exits non-zero because m-000001 failed.
        r = await tvm("task", "wait", "wi", JOB, "--timeout", "60", env=env, ok=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"wi/{JOB}" in r.stderr.decode()  # the progress line
        assert "4 completed: 3 succeeded, 1 failed" in r.stdout.decode()
        counts = await tvm_json("task", "wait", "wi", JOB, env=env, ok=False)
        assert (counts["completed"], counts["failed"]) == (4, 1)

        (
            tlist,
            done,
            active,
            t1,
            ttable,
            files,
            ftable,
            out,
            part,
            _,
            nofile,
            badrange,
        ) = await together(
            tvm_json("task", "list", "wi", JOB, env=env),
            tvm_json("task", "list", "wi", JOB, "--state", "completed", env=env),
            tvm_json("task", "list", "wi", JOB, "--state", "active", env=env),
            tvm_json("task", "show", "wi", JOB, "t1", env=env),
            tvm("task", "list", "wi", JOB, env=env),
            tvm_json("file", "list", "wi", JOB, "t1", env=env),
            tvm("file", "list", "wi", JOB, "t1", env=env),
            tvm("file", "get", "wi", JOB, "t1", "stdout.txt", env=env),
            tvm("file", "get", "wi", JOB, "t1", "stdout.txt", "--range", "0-1", env=env),
            tvm(
                "file",
                "get",
                "wi",
                JOB,
                "fromjson",
                "stdout.txt",
                "--dest",
                str(tmp_path / "copy.txt"),
                env=env,
            ),
            tvm("file", "get", "wi", JOB, "t1", "nope.txt", env=env, ok=False),
            tvm("file", "get", "wi", JOB, "t1", "stdout.txt", "--range", "x", env=env, ok=False),
        )
        tasks = {t["name"]: t for t in tlist}
        assert set(tasks) == {"t1", "m-000000", "m-000001", "fromjson"}
        assert tasks["m-000001"]["executionInfo"]["exitCode"] == 3
        assert len(done) == 4
        assert active == []
        assert t1["executionInfo"]["exitCode"] == 0
        assert t1["environmentSettings"] == [{"name": "GREETING", "value": "hello"}]
        assert "m-000001" in ttable.stdout.decode()
        assert {"stdout.txt", "stderr.txt"} <= {f["name"] for f in files}
        assert "stdout.txt" in ftable.stdout.decode()
        assert out.stdout == b"t1 hello\n"
        assert part.stdout == b"t1"
        assert (tmp_path / "copy.txt").read_bytes() == b"fromjson \n"
        assert nofile.returncode == 1
        assert "Traceback" not in nofile.stderr.decode()
        assert badrange.returncode == 2
        assert "--range" in badrange.stderr.decode()

        # Deletes, then nothing is left.
        assert await tvm_json("task", "delete", "wi", JOB, "t1", env=env) == {"deleted": "t1"}
        assert await tvm_json("workitem", "delete", "wi", env=env) == {"deleted": "wi"}
        assert await tvm_json("pool", "delete", "p", env=env) == {"deleted": "p"}
        assert await together(
            tvm_json("workitem", "list", env=env), tvm_json("pool", "list", env=env)
        ) == [[], []]


def _connections_to(port: int) -> int:
    """This process's established TCP connections whose far end is 127.0.0.1:`port`."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], cols[9]
            if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
                count += 1
    return count


async def test_a_command_run_in_process_closes_its_connection(nursery, tmp_path):
    """A command's client is closed with the command: run in-process (a script, a test) it leaves
    no connection open (it used to stay open until the garbage collector found it)."""
    import gc
    from urllib.parse import urlsplit

    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        port = urlsplit(c.rc.endpoint).port or 0
        env = {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
        await c.client.pools.list()  # the test's own client: open, so not what is counted
        before = _connections_to(port)
        gc.disable()  # a collection in between would close a forgotten one and hide it
        try:
            for args in (["pool", "list"], ["workitem", "add", "wi", "--pool", "p"]):
                res = await trio.to_thread.run_sync(
                    lambda a=args: CliRunner().invoke(cli, a, env=env)
                )
                assert res.exit_code == 0, res.output
            assert _connections_to(port) == before
        finally:
            gc.enable()
