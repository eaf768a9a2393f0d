"""ISO 8601 durations and RFC 3339 times as the REST API spells them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.common.errors import ApiError
from coordinator.common.timeutil import (
    UNLIMITED,
    UNLIMITED_S,
    format_duration,
    parse_duration,
    parse_time,
    rfc3339,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("PT0S", 0),
        ("PT15M", 900),
        ("PT1H30M", 5400),
        ("P1D", 86400),
        ("P7D", 7 * 86400),
        ("P1DT2H3M4S", 86400 + 7200 + 180 + 4),
        ("PT1.5S", 1.5),
        ("PT0.25H", 900),
        ("pt10m", 600),
        (" PT5S ", 5),
        (UNLIMITED, UNLIMITED_S),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text, "f") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "P",
        "PT",
        "P1DT",
        "1H",
        "PT1H30",
        "PT-5S",
        "-PT5S",
        "PT1S2M",
        "P1.D",
        "PTS",
        "PT 1H",
        "P1Y2",
        "forever",
        "PT1E3S",
    ],
)
def test_parse_duration_rejects_with_field(text):
    with pytest.raises(ApiError) as e:
        parse_duration(text, "taskConstraints.maxWallClockTime")
    assert e.value.status == 400
    assert e.value.code == "InvalidPropertyValue"
    assert e.value.values["field"] == "taskConstraints.maxWallClockTime"
    assert "taskConstraints.maxWallClockTime" in e.value.message


def test_parse_duration_rejects_non_string():
    with pytest.raises(ApiError) as e:
        parse_duration(5, "resizeTimeout")  # type: ignore[arg-type]
    assert e.value.values["field"] == "resizeTimeout"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "PT0S"),
        (5, "PT5S"),
        (60, "PT1M"),
        (3600, "PT1H"),
        (5400, "PT1H30M"),
        (86400, "P1D"),
        (86400 + 1, "P1DT1S"),
        (7 * 86400, "P7D"),
        (0.5, "PT0.5S"),
        (61.25, "PT1M1.25S"),
        (1e-05, "PT0.00001S"),
        (UNLIMITED_S, UNLIMITED),
        (UNLIMITED_S * 2, UNLIMITED),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_whole_seconds_round_trip(n):
    assert parse_duration(format_duration(n), "f") == n


@given(st.floats(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False))
def test_fractional_round_trip_close(x):
    text = format_duration(x)
    assert "e" not in text.lower()
    assert parse_duration(text, "f") == pytest.approx(x, rel=1e-6, abs=1e-6)


def test_rfc3339_and_parse_time_round_trip():
    ts = datetime(2026, 11, 25, 3, 4, 5, 123456, tzinfo=UTC).timestamp()
    text = rfc3339(ts)
    assert text == "2026-11-25T03:04:05.123456Z"
    assert parse_time(text, "t") == pytest.approx(ts)
    assert rfc3339(None) is None
    # Offsets and naive times (taken as UTC) are understood.
    assert parse_time("2026-11-25T04:04:05.123456+01:00", "t") == pytest.approx(ts)
    assert parse_time("2026-11-25T03:04:05.123456", "t") == pytest.approx(ts)


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01T00:00:00Z", None, 5])
def test_parse_time_rejects_with_field(text):
    with pytest.raises(ApiError) as e:
        parse_time(text, "schedule.doNotRunUntil")  # type: ignore[arg-type]
    assert e.value.status == 400
    assert e.value.values["field"] == "schedule.doNotRunUntil"
