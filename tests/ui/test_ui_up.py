"""`tvm up` prints the dashboard's URL, and that URL serves the login page."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx2

from tests.harness import agent_env


def test_tvm_up_prints_the_dashboard_url(tmp_path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "up",
            "--port",
            "0",
            "--agents",
            "0",
            "--no-provision",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=agent_env(),
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        url = ""
        for raw in proc.stderr:  # ends if tvm up exits: then the assertion below says what it wrote
            line = raw.decode(errors="replace").rstrip("\n")
            seen.append(line)
            if "tvm up: dashboard at " in line:
                url = line.split("dashboard at ", 1)[1].split()[0]
                break
        assert url.endswith("/ui/"), seen
        r = httpx2.get(url, follow_redirects=True, timeout=30)
        assert r.status_code == 200
        assert 'id="key"' in r.text  # not logged in: the login form
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
