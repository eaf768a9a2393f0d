"""What the evaluator reads and what it returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from ._names import DEALLOCATION_OPTIONS, SERIES_NAMES


class Sample(msgspec.Struct, frozen=True):
    """One metric sample (reference §5.7: one every 30 s)."""

    timestamp: datetime  # timezone-aware (UTC)
    value: float


def _aware(name: str, dt: datetime) -> None:
    if not isinstance(dt, datetime) or dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got {dt!r}")


@dataclass(frozen=True, kw_only=True)
class AutoscaleInputs:
    """Everything a formula can read. The evaluator never looks at the real clock."""

    now: datetime
    # canonical series name (see SERIES_NAMES, e.g. "ActiveTasks") -> samples, any order;
    # a missing name is an empty history; samples after ``now`` are not visible
    series: Mapping[str, Sequence[Sample]] = field(default_factory=dict)
    sample_period: timedelta = timedelta(seconds=30)
    # read-only scalars
    current_dedicated: int = 0
    current_low_priority: int = 0
    task_slots_per_node: int = 1
    usable_node_count: int = 0
    # the settable variables' values when the evaluation starts (reference §5.6)
    target_dedicated: int = 0
    target_low_priority: int = 0
    deallocation_option: str = "requeue"
    # Also report $TargetLowPriorityNodes in the results when the formula does not mention it
    # (the modern service does; the 2015/2016 service of the docs' examples did not).
    report_low_priority: bool = False
    random_seed: int | None = None  # for rand(); None = unpredictable

    def __post_init__(self) -> None:
        _aware("now", self.now)
        unknown = sorted(set(self.series) - set(SERIES_NAMES))
        if unknown:
            raise ValueError(f"unknown series {unknown}; known: {', '.join(SERIES_NAMES)}")
        for name, samples in self.series.items():
            for s in samples:
                _aware(f"sample timestamp of {name}", s.timestamp)
        if self.sample_period <= timedelta(0):
            raise ValueError("sample_period must be positive")
        if self.deallocation_option not in DEALLOCATION_OPTIONS:
            raise ValueError(f"deallocation_option must be one of {DEALLOCATION_OPTIONS}")


@dataclass(frozen=True, kw_only=True)
class AutoscaleResult:
    results: str  # "$name=value;..." (reference §5.8); "" when error is set
    target_dedicated: int | None = None  # None: the formula did not set it (or failed)
    target_low_priority: int | None = None
    deallocation_option: str | None = None  # None: not assigned (the service default is requeue)
    error: tuple[str, str] | None = None  # (code, message)
