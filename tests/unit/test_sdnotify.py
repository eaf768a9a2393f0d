"""sd_notify datagrams on real sockets, and the watchdog pet logic without waiting."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from protocol.sdnotify import SYSTEMD_ENV_VARS, WatchdogPolicy, notify, watchdog_loop


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # short dir: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"tvm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def _nothing_pending(sock: socket.socket) -> bool:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def test_notify_path_socket_gets_one_datagram(path_socket: socket.socket) -> None:
    assert notify("READY=1", "STATUS=connected to ws://c:7070") is True
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=connected to ws://c:7070"
    assert _nothing_pending(path_socket)


def test_notify_abstract_socket(abstract_socket: socket.socket) -> None:
    assert notify("STOPPING=1") is True
    assert abstract_socket.recv(4096) == b"STOPPING=1"


def test_notify_from_child_process_inherits_socket(path_socket: socket.socket) -> None:
    code = "from protocol.sdnotify import notify; raise SystemExit(0 if notify('READY=1') else 3)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert path_socket.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "@"])
def test_notify_without_usable_socket_returns_false(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False


def test_notify_to_missing_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(d, "nobody-listens"))
        assert notify("READY=1") is False


@pytest.mark.parametrize("states", [(), ("READY",), ("=1",), ("STATUS=two\nlines",)])
def test_notify_rejects_malformed_states(
    path_socket: socket.socket, states: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notify(*states)
    assert _nothing_pending(path_socket)


def test_systemd_env_vars_listed() -> None:
    assert set(SYSTEMD_ENV_VARS) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


# --- WatchdogPolicy ---------------------------------------------------------------------


def test_policy_disabled_without_env() -> None:
    policy = WatchdogPolicy.from_env({}, pid=10)
    assert not policy.enabled
    assert not policy.due(0.0)
    assert not policy.due(1e9)
    assert policy.next_due() == math.inf


def test_policy_interval_is_half_of_watchdog_usec() -> None:
    policy = WatchdogPolicy.from_env({"WATCHDOG_USEC": "30000000"}, pid=10)
    assert policy.enabled
    assert policy.interval == 15.0


def test_policy_honours_watchdog_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "10"}
    assert WatchdogPolicy.from_env(env, pid=10).interval == 1.0
    # meant for another process: we must not pet on its behalf
    assert not WatchdogPolicy.from_env(env, pid=11).enabled


def test_policy_defaults_to_own_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert WatchdogPolicy.from_env(env).enabled


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC must be a whole number"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC must be positive"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC must be positive"),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, "WATCHDOG_PID must be a process id"),
    ],
)
def test_policy_rejects_garbage_env(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WatchdogPolicy.from_env(env, pid=1)


@pytest.mark.parametrize("interval", [0.0, -1.0, math.nan, math.inf])
def test_policy_rejects_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        WatchdogPolicy(interval=interval)


def test_policy_due_and_petted() -> None:
    policy = WatchdogPolicy(interval=15.0)
    assert policy.due(0.0)  # never petted: due at once
    assert policy.due(-100.0)
    policy.petted(100.0)
    assert not policy.due(100.0)
    assert not policy.due(114.999)
    assert policy.due(115.0)
    assert policy.next_due() == 115.0
    # a wedged loop that stops petting stays overdue (systemd then restarts the service)
    assert policy.due(1000.0)
    policy.petted(1000.0)
    assert policy.next_due() == 1015.0


# --- watchdog_loop ------------------------------------------------------------------------


async def test_watchdog_loop_pets_each_interval(
    path_socket: socket.socket, mock_clock: trio.testing.MockClock
) -> None:
    policy = WatchdogPolicy(interval=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog_loop, policy)
        await trio.testing.wait_all_tasks_blocked()
        assert path_socket.recv(4096) == b"WATCHDOG=1"
        mock_clock.jump(9.0)
        await trio.testing.wait_all_tasks_blocked()
        assert _nothing_pending(path_socket)
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert path_socket.recv(4096) == b"WATCHDOG=1"
        assert _nothing_pending(path_socket)
        nursery.cancel_scope.cancel()


async def test_watchdog_loop_disabled_returns(path_socket: socket.socket) -> None:
    with trio.fail_after(5):
        await watchdog_loop(WatchdogPolicy())
    assert _nothing_pending(path_socket)
