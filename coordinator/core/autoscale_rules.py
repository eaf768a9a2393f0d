"""Autoscale settings of a pool spec: formula and evaluation-interval checks (pure functions).

Below `pools` (the pool spec check includes them) and `autoscale` (which runs the formulas).
"""

from __future__ import annotations

import msgspec

from coordinator.autoscale import FormulaError, Program, parse
from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import format_duration, parse_duration

from .records import PoolRec
from .store import AutoscaleTiming


def parse_formula(formula: str, prefix: str = "") -> Program:
    try:
        return parse(formula)
    except FormulaError as exc:
        values: dict[str, object] = {"field": prefix + "autoScaleFormula"}
        if exc.line is not None:
            values.update(line=exc.line, column=exc.column)
        raise ApiError(
            400, exc.code, f"{prefix}autoScaleFormula: {exc.message}", **values
        ) from None


def parse_interval(t: AutoscaleTiming, text: str | None, prefix: str = "") -> float:
    if text is None:
        return t.default_interval
    field = prefix + "autoScaleEvaluationInterval"
    seconds = parse_duration(text, field)
    if not t.min_interval <= seconds <= t.max_interval:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be between {format_duration(t.min_interval)} and "
            f"{format_duration(t.max_interval)}, got {text!r}",
            field=field,
        )
    return seconds


def interval_of(t: AutoscaleTiming, pool: PoolRec) -> float:
    text = pool.spec.auto_scale_evaluation_interval
    try:
        return max(t.min_interval, parse_duration(text, "i")) if text else t.default_interval
    except ApiError:
        return t.default_interval


def check_autoscale_spec(t: AutoscaleTiming, req: m.PoolAdd, prefix: str = "") -> m.PoolAdd:
    """The autoscale part of a pool spec check (user pools and auto pools); returns the spec with
    its interval normalised."""
    if req.enable_auto_scale:
        if req.target_dedicated:
            raise bad_request(
                "InvalidPropertyValue",
                f"{prefix}targetDedicated must be absent (or 0) when enableAutoScale is true: "
                "the formula sets the target",
                field=prefix + "targetDedicated",
            )
        if req.auto_scale_formula is None:
            raise bad_request(
                "MissingRequiredProperty",
                f"{prefix}enableAutoScale needs autoScaleFormula",
                field=prefix + "autoScaleFormula",
            )
        parse_formula(req.auto_scale_formula, prefix)
        interval = parse_interval(t, req.auto_scale_evaluation_interval, prefix)
        req = msgspec.structs.replace(req, auto_scale_evaluation_interval=format_duration(interval))
    elif req.auto_scale_formula is not None or req.auto_scale_evaluation_interval is not None:
        raise bad_request(
            "InvalidPropertyValue",
            f"{prefix}autoScaleFormula and autoScaleEvaluationInterval need enableAutoScale: true",
            field=prefix + "enableAutoScale",
        )
    return req
