"""Exit codes both sides give a task that did not end by itself (the seed's values)."""

from __future__ import annotations

# A task killed for outliving maxWallClockTime (Windows' STATUS_CONTROL_C_EXIT, as Azure Batch reports).
WALL_CLOCK_EXIT_CODE = 0xC000013A
# A task that never got an exit code of its own (launch failed, killed before it ran, agent error).
NO_EXIT_CODE = -1
