"""Where the agent clones a task (tvmagent/launch/place.py): the setting, a bad setting, and what
`auto` looks at."""

from __future__ import annotations

import logging

import pytest

from tvmagent.launch import place
from tvmagent.launch.batch import BatchThread


class FakeThread(BatchThread):
    def __init__(self, busy: bool) -> None:
        super().__init__()
        self._busy = busy

    def busy(self) -> bool:
        return self._busy


def test_fixed_places(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(place, "host_load", lambda: 0.5)
    assert place.ClonePlace("loop").on_loop(FakeThread(busy=True))
    assert not place.ClonePlace("thread").on_loop(FakeThread(busy=False))
    monkeypatch.setenv(place.ENV, " Thread ")
    assert place.ClonePlace().mode == "thread"
    monkeypatch.delenv(place.ENV)
    assert place.ClonePlace().mode == "auto"


def test_a_bad_setting_is_named_and_auto_is_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(place.ENV, "fast")
    with caplog.at_level(logging.WARNING, logger="tvm.agent"):
        chosen = place.ClonePlace()
    assert chosen.mode == "auto"
    assert "TVM_AGENT_CLONE_ON='fast' is not one of auto, loop, thread" in caplog.text


def test_auto_clones_on_the_loop_only_on_a_quiet_host_with_an_idle_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auto = place.ClonePlace("auto")
    cpus = auto._cpus
    monkeypatch.setattr(place, "host_load", lambda: cpus - 0.1)
    assert auto.on_loop(FakeThread(busy=False))
    assert not auto.on_loop(FakeThread(busy=True))  # a start here would overtake the queued ones
    monkeypatch.setattr(place, "host_load", lambda: float(cpus))  # every CPU busy on average
    assert not place.ClonePlace("auto").on_loop(FakeThread(busy=False))


def test_the_load_is_looked_at_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    looks: list[float] = []
    load = [0.0]

    def host_load() -> float:
        looks.append(now[0])
        return load[0]

    monkeypatch.setattr(place, "_now", lambda: now[0])
    monkeypatch.setattr(place, "host_load", host_load)
    auto, idle = place.ClonePlace("auto"), FakeThread(busy=False)
    assert auto.on_loop(idle)
    load[0] = 99.0  # the host got busy
    now[0] += 0.5
    assert auto.on_loop(idle)  # not looked at again yet
    now[0] += 0.6
    assert not auto.on_loop(idle)
    assert looks == [100.0, 101.1]


def test_host_load_reads_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 0 <= place.host_load() < float("inf")

    def unreadable() -> tuple[float, float, float]:
        raise OSError("no /proc")

    monkeypatch.setattr(place.os, "getloadavg", unreadable)
    assert place.host_load() == float("inf")
    assert not place.ClonePlace("auto").on_loop(FakeThread(busy=False))


def test_a_new_launcher_thread_is_not_busy() -> None:
    assert not BatchThread().busy()
