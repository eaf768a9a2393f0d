"""Reliability suites: each module runs one kind of failure against real processes and returns its
figures as rows `{"name", "parameters", "value", "unit"}`.

    python -m benchmarks.reliability [--quick]        every suite present, JSON lines + a summary
    python -m benchmarks.reliability.<suite> [--quick]  one suite

A suite module exposes `run(full: bool) -> list[dict]`; it raises `Skipped` (with the reason) when
the host lacks what it needs (network namespaces, nftables, root).
"""

from __future__ import annotations

import json
import sys
from typing import Any

SUITES = ["crash", "agentcrash", "partition", "disk", "load", "fuzz", "clock"]

# Counts of tasks, events and inputs are figures here, beside the benchmarks' own units.
UNITS = ("tasks/s", "ms", "bytes", "s", "ratio", "count")


class Skipped(Exception):
    """The suite cannot run on this host; the message says why."""


def row(name: str, parameters: dict[str, Any], value: float, unit: str) -> dict[str, Any]:
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r} is not one of {UNITS}")
    return {"name": name, "parameters": parameters, "value": round(float(value), 4), "unit": unit}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(json.dumps(r), flush=True)


def main_for(module_run: Any, argv: list[str] | None = None) -> int:
    """`python -m benchmarks.reliability.<suite>`: run it, print its rows, 1 when skipped."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="the small (CI-size) run")
    a = p.parse_args(argv)
    try:
        rows = module_run(full=not a.quick)
    except Skipped as e:
        say(f"skipped: {e}")
        return 1
    print_rows(rows)
    return 0
