"""Names the language knows: service variables, constants, keywords, functions, members.

All matching is case-insensitive (reference §5.1, inferred from the REST sample that assigns
``$targetDedicatedNodes``), so every table is keyed by the lower-cased spelling.
"""

from __future__ import annotations

import enum

DEDICATED = "TargetDedicatedNodes"
LOW_PRIORITY = "TargetLowPriorityNodes"
DEALLOCATION = "NodeDeallocationOption"

# lower-cased spelling -> (canonical variable, is the legacy alias)
READ_WRITE: dict[str, tuple[str, bool]] = {
    "$targetdedicatednodes": (DEDICATED, False),
    "$targetdedicated": (DEDICATED, True),
    "$targetlowprioritynodes": (LOW_PRIORITY, False),
    "$targetlowpriority": (LOW_PRIORITY, True),
    "$nodedeallocationoption": (DEALLOCATION, False),
    "$tvmdeallocationoption": (DEALLOCATION, True),
}

SCALARS: dict[str, str] = {
    "$currentdedicatednodes": "CurrentDedicatedNodes",
    "$currentdedicated": "CurrentDedicatedNodes",
    "$currentlowprioritynodes": "CurrentLowPriorityNodes",
    "$taskslotspernode": "TaskSlotsPerNode",
    "$usablenodecount": "UsableNodeCount",
}

SERIES_NAMES: tuple[str, ...] = (
    "CPUPercent",
    "WallClockSeconds",
    "MemoryBytes",
    "DiskBytes",
    "DiskReadBytes",
    "DiskWriteBytes",
    "DiskReadOps",
    "DiskWriteOps",
    "NetworkInBytes",
    "NetworkOutBytes",
    "SampleNodeCount",
    "ActiveTasks",
    "RunningTasks",
    "PendingTasks",
    "SucceededTasks",
    "FailedTasks",
    "PreemptedNodeCount",
)
SERIES: dict[str, str] = {"$" + n.lower(): n for n in SERIES_NAMES}
SERIES["$sampletvmcount"] = "SampleNodeCount"

TICKS_PER_SECOND = 10_000_000  # one tick = 100 ns, as a .NET TimeSpan
_DAY = 86_400 * TICKS_PER_SECOND
INTERVALS: dict[str, int] = {
    "timeinterval_zero": 0,
    "timeinterval_100ns": 1,
    "timeinterval_microsecond": 10,
    "timeinterval_millisecond": 10_000,
    "timeinterval_second": TICKS_PER_SECOND,
    "timeinterval_minute": 60 * TICKS_PER_SECOND,
    "timeinterval_hour": 3600 * TICKS_PER_SECOND,
    "timeinterval_day": _DAY,
    "timeinterval_week": 7 * _DAY,
    "timeinterval_year": 365 * _DAY,
}

DEALLOCATION_OPTIONS: tuple[str, ...] = ("requeue", "terminate", "taskcompletion", "retaineddata")

TIMESTAMP_MEMBERS: tuple[str, ...] = ("year", "month", "day", "weekday", "hour", "minute", "second")

# lower-cased -> canonical spelling (for messages)
SAMPLE_METHODS: dict[str, str] = {
    m.lower(): m
    for m in ("GetSample", "GetSamplePercent", "GetSamplePeriod", "Count", "HistoryBeginTime")
}


class Kind(enum.Enum):
    USER = "user variable"
    READ_WRITE = "service variable"
    SCALAR = "read-only service variable"
    SERIES = "sample variable"
    INTERVAL = "time interval constant"
    OPTION = "deallocation option"


def classify(spelling: str) -> tuple[Kind, str]:
    """Kind and lookup key of an identifier as written in the formula."""
    low = spelling.lower()
    if low in READ_WRITE:
        return Kind.READ_WRITE, low
    if low in SCALARS:
        return Kind.SCALAR, SCALARS[low]
    if low in SERIES:
        return Kind.SERIES, SERIES[low]
    if low in INTERVALS:
        return Kind.INTERVAL, low
    if low in DEALLOCATION_OPTIONS:
        return Kind.OPTION, low
    return Kind.USER, low
