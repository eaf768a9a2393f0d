"""Logging setup: structlog for our events, stdlib libraries routed through the same renderer.

Logs go to stderr (stdout belongs to command output and the `tvm up` export lines). With
`--log-format json` every line is one JSON object: `timestamp`, `level`, `logger`, `event`, plus
whatever context the code bound — `task`, `job`, `tvm`, `attempt` inside a task's Trio task on the
agent (`structlog.contextvars`, which Trio copies per task), `agent` on the coordinator's link
handlers — and `extra={...}` fields of stdlib calls. Exceptions come out as an `exception` string.
"""

from __future__ import annotations

import logging
import sys

import structlog

LOG_FORMATS = ("json", "console")


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # Plain tracebacks: the same text whether or not rich happens to be imported (the agent
        # keeps it out, see tvmagent/__init__.py).
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if fmt == "json":
        # A traceback as one string field: a JSON line must stay one line.
        final.append(structlog.processors.format_exc_info)
    final.append(renderer)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Library chatter stays at warning unless asked for.
    for noisy in ("hypercorn.error", "trio-websocket", "httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
