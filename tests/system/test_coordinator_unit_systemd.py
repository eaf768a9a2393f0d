"""The coordinator unit as `tvm coordinator install-service` writes it, run by a real (private)
systemd: it starts (Type=notify), keeps its state in its StateDirectory under ProtectSystem=strict,
answers REST, stops cleanly on `systemctl stop`, and finds its state again when started anew.

The installer's drop-in is what lets the unit reach this machine's interpreter (pyenv, under /root,
which ProtectHome=yes hides) and a CI clone or the test's config (under /tmp, which PrivateTmp=yes
replaces): with the unit alone the service would not start. The test adds one drop-in of its own,
about the private systemd rather than the unit: stdout goes to a file (no journald runs there)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from coordinator.cli.install_service import DROP_IN, install_coordinator_service
from tests.harness import free_port, sync_client, wait_sync
from tests.provisioners.systemd_ns import boot_systemd, stop_systemd
from tvmagent.install_service import COORDINATOR_UNIT_NAME

MADE_BY_UNIT = ("/var/lib/tvm-coordinator", "/var/log/tvm-coordinator")
RUN = "/run/tvm-test-coordinator"


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            k, _, v = line[len("export ") :].partition("=")
            out[k] = v
    return out


def test_the_coordinator_unit_runs_the_coordinator_under_systemd(tmp_path) -> None:
    tvm_bin = os.path.join(os.path.dirname(sys.executable), "tvm")
    if not os.access(tvm_bin, os.X_OK):
        pytest.skip(f"no `tvm` command beside {sys.executable}")
    existed = [p for p in MADE_BY_UNIT if os.path.lexists(p)]
    ns = boot_systemd(str(tmp_path / "systemd"))
    try:
        port = free_port()
        units, etc = tmp_path / "units", tmp_path / "etc"
        said_by_installer = install_coordinator_service(
            host="127.0.0.1",
            port=port,
            unit_dir=str(units),
            config_dir=str(etc),
            tvm_bin=tvm_bin,
            enable=False,
        )
        made = units / f"{COORDINATOR_UNIT_NAME}.d" / DROP_IN
        assert made.exists(), said_by_installer  # the config is under /tmp (PrivateTmp hides it)
        (tmp_path / "test.conf").write_text(
            f"[Service]\nStandardOutput=file:{RUN}/stdout\nStandardError=file:{RUN}/stdout\n"
        )
        d = f"/run/systemd/system/{COORDINATOR_UNIT_NAME}.d"
        for step in (
            ["mkdir", "-p", RUN, d],
            [
                "cp",
                str(units / COORDINATOR_UNIT_NAME),
                f"/run/systemd/system/{COORDINATOR_UNIT_NAME}",
            ],
            ["cp", str(made), f"{d}/{DROP_IN}"],
            ["cp", str(tmp_path / "test.conf"), f"{d}/test.conf"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "start", "--no-block", COORDINATOR_UNIT_NAME],
        ):
            out = ns.run(*step)
            assert out.returncode == 0, (step, out.stderr)

        def state() -> str:
            return ns.run("systemctl", "is-active", COORDINATOR_UNIT_NAME).stdout.strip()

        def said() -> str:
            status = ns.run("systemctl", "status", "--no-pager", COORDINATOR_UNIT_NAME).stdout
            return ns.run("cat", f"{RUN}/stdout").stdout + "\n" + status

        def wait(cond, what: str) -> None:  # noqa: ANN001
            try:
                wait_sync(cond, 60, what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the coordinator said: {said()[-3000:]}") from None

        wait(lambda: state() == "active", "the unit active")
        env = _exports(said())
        assert env.get("TVM_ENDPOINT") == f"http://127.0.0.1:{port}", said()
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=0)
        assert [p.name for p in client.pools.list()] == ["p"]
        out = ns.run("systemctl", "stop", COORDINATOR_UNIT_NAME)
        assert out.returncode == 0, out.stderr
        assert state() == "inactive", said()[-3000:]
        out = ns.run("systemctl", "start", "--no-block", COORDINATOR_UNIT_NAME)
        assert out.returncode == 0, out.stderr
        wait(lambda: state() == "active", "the unit active again")
        again = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        wait(lambda: _answers(again), "the coordinator answering again")
        assert [p.name for p in again.pools.list()] == ["p"]  # its state, kept across the restart
    finally:
        stop_systemd(ns)
        for p in MADE_BY_UNIT:
            if p not in existed:
                shutil.rmtree(p, ignore_errors=True)


def _answers(client) -> bool:
    try:
        client.pools.list()
        return True
    except Exception:  # noqa: BLE001 - not listening yet
        return False
