"""`tvm up` prints the dashboard's URL, that URL serves the login page, and an open live feed does
not hold up stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx2

from coordinator.client import Client
from coordinator.client._http import _Call
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=agent_env(),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        exports = {}
        for _ in range(3):
            k, _, v = proc.stdout.readline().decode().strip().removeprefix("export ").partition("=")
            exports[k] = v
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

        # A browser's live feed stays open while tvm up stops: it still exits, and cleanly.
        with Client(exports["TVM_ENDPOINT"], exports["TVM_ACCOUNT"], exports["TVM_KEY"]) as cl:
            path = cl._call(_Call("POST", "/ui/api/login-token", {}, parse=lambda r: r.json()))
        http = httpx2.Client(base_url=exports["TVM_ENDPOINT"], timeout=60)
        cookie = http.get(path["path"]).headers["set-cookie"].split(";", 1)[0]
        got_event = threading.Event()

        def watch() -> None:
            try:
                with http.stream("GET", "/ui/events", headers={"cookie": cookie}) as s:
                    for line in s.iter_lines():
                        if line.startswith("data: "):
                            got_event.set()
            except httpx2.HTTPError:
                pass  # the server went away: what this test wants

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        assert got_event.wait(30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        t.join(timeout=30)
        assert not t.is_alive()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
