"""Pool usage metrics from TVM time (core/usage.py): split into half hours, counted while a TVM is
in its pool, kept on the pool's record when it leaves (through the real journal and a restore), and
only complete intervals unless the one in progress is asked for (on each store: SQLite, and
PostgreSQL where it exists). Also the SHA-512 crypt that node
users' passwords are sent as, checked against openssl's."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from coordinator.common import models as m
from coordinator.common.passhash import sha512_crypt
from coordinator.core import CoordinatorState, usage
from protocol import messages as pm

START = 3_000_000.0 - 3_000_000.0 % usage.INTERVAL_S  # an interval boundary


class Clock:
    now = START + 600.0

    def __call__(self) -> float:
        return self.now


def test_split_into_half_hours() -> None:
    assert list(usage.split(START + 600, START + 600)) == []
    assert list(usage.split(START + 600, START + 1200)) == [(int(START), 600.0)]
    got = list(usage.split(START + 1700, START + 1800 + 1800 + 50))
    assert got == [
        (int(START), 100.0),
        (int(START) + 1800, 1800.0),
        (int(START) + 3600, 50.0),
    ]


def _core(clock: Clock, store: Any) -> CoordinatorState:
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, vm_size="large"))  # 4 cores
    tvm = next(iter(core.tvms.values()))
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    store.apply(core.take_effects().writes)
    return core


def _rows(core: CoordinatorState, partial: bool = False) -> list[tuple[str, float, float]]:
    rows = usage.metrics(core.store, core.clock(), 0.0, 1e12, partial=partial)
    return [(r.pool, r.start - START, r.core_hours) for r in rows]


def test_usage_counts_tvm_time_and_survives_its_departure(open_store: Any) -> None:
    clock = Clock()
    store = open_store("j.db")
    core = _core(clock, store)
    assert _rows(core) == []  # the interval in progress is not over
    assert _rows(core, partial=True) == []  # nothing counted yet: no time has passed
    clock.now = START + 1800 + 900  # 20 min of the first half hour, 15 of the second
    assert _rows(core) == [("p", 0.0, round(4 * 1200 / 3600, 6))]
    assert _rows(core, partial=True) == [
        ("p", 0.0, round(4 * 1200 / 3600, 6)),
        ("p", 1800.0, 1.0),
    ]
    tvm = next(iter(core.tvms.values()))
    core.remove_tvms("p", m.TvmRemove(tvm_names=[tvm.rec.name]))
    core.agent_message("a0", pm.TvmLeft(tvm_name=tvm.rec.name))
    assert core.tvms == {}
    store.apply(core.take_effects().writes)
    clock.now = START + 4 * 1800  # later: the TVM's time stays what it was
    expected = [("p", 0.0, round(4 * 1200 / 3600, 6)), ("p", 1800.0, 1.0)]
    assert _rows(core) == expected
    again = CoordinatorState("acct", epoch=2, clock=clock, heartbeat_timeout=10.0)
    again.restore(store.load())
    assert _rows(again) == expected
    window = usage.metrics(again.store, clock.now, START + 1800, START + 3600)
    assert [(r.start - START, r.vm_size) for r in window] == [(1800.0, "large")]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    ("password", "salt"),
    [("hello", "saltsalt"), ("x" * 100, "0123456789abcdefXX"), ("pässwörd:1", "Q./z")],
)
def test_sha512_crypt_matches_openssl(password: str, salt: str) -> None:
    ref = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt[:16], "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert sha512_crypt(password, salt) == ref
    fresh = sha512_crypt(password)
    assert fresh.startswith("$6$")
    assert fresh != sha512_crypt(password)  # a new random salt each time
