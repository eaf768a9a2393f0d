"""mypy over the three packages, with the settings in pyproject.toml's [tool.mypy].

`.ci/run` runs the test suite, so this is how CI type-checks the packages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
