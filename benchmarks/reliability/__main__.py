"""`python -m benchmarks.reliability [--quick] [--only crash,partition]`: every suite module present
(see SUITES), one after the other; their rows as JSON lines on stdout, a summary of the figures
that must be zero and of the timings on stderr. Exit status 1 when a must-be-zero figure is not."""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

from . import SUITES, Skipped, print_rows, say

# Figures that are failures when not zero, whatever the suite (by the end of the row's name).
MUST_BE_ZERO = (
    "_tasks_lost",
    "_completions_recorded_twice",
    "_reruns_unexplained",
    "_cut_tasks_not_completed_elsewhere",
    "_victim_tvms_left_in_pool",
    "_crashes",
    "_5xx",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="the small (CI-size) runs")
    p.add_argument("--only", default="", help="comma-separated suites to run (default: all)")
    a = p.parse_args(argv)
    wanted = [s for s in a.only.split(",") if s] or SUITES
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        p.error(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
    all_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in wanted:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            notes.append(f"{name}: not present")
            continue
        t0 = time.monotonic()
        say(f"== {name}")
        try:
            rows = mod.run(full=not a.quick)
        except Skipped as e:
            notes.append(f"{name}: skipped ({e})")
            continue
        print_rows(rows)
        all_rows += rows
        notes.append(f"{name}: {len(rows)} figures in {time.monotonic() - t0:.0f} s")
    bad = [r for r in all_rows if r["name"].endswith(MUST_BE_ZERO) and r["value"] != 0]
    say("\n== summary")
    for n in notes:
        say(f"  {n}")
    for r in all_rows:
        if r["unit"] == "s" or r["name"].endswith(MUST_BE_ZERO) or "requeue" in r["name"]:
            params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items())
            say(f"  {r['name']:48} {r['value']:>10} {r['unit']:5} ({params})")
    say(f"  must-be-zero figures not zero: {len(bad)}")
    for r in bad:
        say(f"    {r['name']} = {r['value']} ({r['parameters']})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
