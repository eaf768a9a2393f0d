"""mypy over the three packages, with the settings in pyproject.toml's [tool.mypy].

Skipped until the core and agent redesign land: the old scheduler mixins and the agent still carry
type errors. Set TVM_TYPECHECK=1 to run it now; delete the skip marker once they are gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    os.environ.get("TVM_TYPECHECK") != "1",
    reason="enabled once the core and agent redesign land (TVM_TYPECHECK=1 runs it now)",
)
def test_mypy_is_clean() -> None:
    # From the repo root, so mypy reads pyproject.toml's [tool.mypy] like a developer's run does.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "protocol", "coordinator", "tvmagent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}{proc.stderr}"
