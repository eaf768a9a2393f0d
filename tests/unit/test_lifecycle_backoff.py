"""Issue 9, agent reconnect policy (pure): exponential backoff, capped by the coordinator's heartbeat
interval once known, so a restarted coordinator sees its agents within its recovery window."""

from __future__ import annotations

from tvmagent.link import next_backoff


def _series(n: int, max_backoff: float, heartbeat: float) -> list[float]:
    b, out = 0.1, []
    for _ in range(n):
        out.append(b)
        b = next_backoff(b, max_backoff, heartbeat)
    return out


def test_never_connected_doubles_up_to_the_configured_maximum():
    s = _series(12, 30.0, 0.0)
    assert s[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert s == sorted(s)
    assert max(s) == 30.0


def test_known_heartbeat_interval_caps_the_delay():
    # heartbeat timeout 30 s -> interval 7.5 s: never wait longer than that between attempts
    assert max(_series(20, 30.0, 7.5)) == 7.5
    # a configured maximum below the interval still wins
    assert max(_series(20, 2.0, 7.5)) == 2.0
    # tiny intervals (tests) do not turn into a busy loop
    assert min(_series(5, 30.0, 0.01)) == 0.1
