"""The TVM agent."""

import sys

if "structlog" not in sys.modules and "rich" not in sys.modules:
    # structlog.dev imports `rich` (~6 MiB resident) only for coloured tracebacks, which the agent's
    # logs do not use (protocol/logsetup.py renders plain ones); an idle agent should stay under
    # 40 MiB (issue 10). The block is lifted right away, so the CLI's tables can still import rich.
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
