"""The agent installed by `tvm agent install-service`, run by a real systemd (a private one, PID 1
of its own namespaces: tests/provisioners/systemd_ns.py): the unit starts it (Type=notify), its TVM
joins a pool, a task runs as a task user in the pool's group, a node user is made with its home,
and `systemctl stop` ends it cleanly (its group removed, the unit inactive, not failed)."""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import trio

from tests.harness import cluster_ctx
from tests.provisioners.systemd_ns import boot_systemd, stop_systemd
from tests.security.pool_groups import open_agent_base, remove_pool_groups
from tests.system.agent_work import does_its_work, remove_user
from tvmagent.install_service import AGENT_UNIT_NAME, install_agent_service

# What the unit makes systemd create on the host (the namespace shares /var): removed afterwards
# unless they were there before.
MADE_BY_UNIT = ("/var/lib/tvm-agent", "/var/log/tvm-agent")


async def test_the_installed_agent_unit_runs_the_agent_under_systemd(nursery, tmp_path) -> None:
    tvm_bin = os.path.join(os.path.dirname(sys.executable), "tvm")
    if not os.access(tvm_bin, os.X_OK):
        pytest.skip(f"no `tvm` command beside {sys.executable}")
    existed = [p for p in MADE_BY_UNIT if os.path.lexists(p)]
    ns = boot_systemd(str(tmp_path / "systemd"))
    name = f"us{secrets.token_hex(3)}"
    try:
        with open_agent_base("tvm-unit-sd-") as base:
            root = os.path.join(base, "root")
            async with cluster_ctx(nursery, tmp_path) as c:
                units, conf = os.path.join(base, "units"), os.path.join(base, "etc")
                install_agent_service(
                    c.rc.agent_url,
                    c.rc.join_token,
                    root,
                    unit_dir=units,
                    config_dir=conf,
                    tvm_bin=tvm_bin,
                    enable=False,
                )
                unit = os.path.join(units, AGENT_UNIT_NAME)
                # Its watchdog, shortened so the test sees several periods (30 s in the unit).
                drop_in = os.path.join(base, "watchdog.conf")
                Path(drop_in).write_text("[Service]\nWatchdogSec=2s\n")
                d = f"/run/systemd/system/{AGENT_UNIT_NAME}.d"
                for step in (
                    ["mkdir", "-p", d],
                    ["cp", drop_in, f"{d}/watchdog.conf"],
                    ["cp", unit, f"/run/systemd/system/{AGENT_UNIT_NAME}"],
                    ["systemctl", "daemon-reload"],
                    ["systemctl", "start", "--no-block", AGENT_UNIT_NAME],
                ):
                    out = ns.run(*step)
                    assert out.returncode == 0, (step, out.stderr)

                def unit_state() -> str:
                    return ns.run("systemctl", "is-active", AGENT_UNIT_NAME).stdout.strip()

                def journal() -> str:
                    return ns.run(
                        "systemctl", "status", "--no-pager", "-n", "40", AGENT_UNIT_NAME
                    ).stdout

                await c.wait_for(
                    lambda: unit_state() == "active", 60, "the unit active (READY sent)"
                )
                group = await does_its_work(c, root, name, journal)
                main_pid = ns.run("systemctl", "show", "-p", "MainPID", AGENT_UNIT_NAME).stdout
                await trio.sleep(5)  # two and a half watchdog periods: the agent pets it
                shown = ns.run(
                    "systemctl", "show", "-p", "MainPID", "-p", "NRestarts", AGENT_UNIT_NAME
                )
                assert shown.stdout.split() == [main_pid.strip(), "NRestarts=0"], journal()
                out = ns.run("systemctl", "stop", "--no-block", AGENT_UNIT_NAME)
                assert out.returncode == 0, out.stderr
                await c.wait_for(
                    lambda: unit_state() in ("inactive", "failed"), 60, "the unit stopped"
                )
                assert unit_state() == "inactive", journal()
                with pytest.raises(KeyError):
                    grp.getgrnam(group)  # the agent removed its pool group as it stopped
                remove_pool_groups(base)
    finally:
        stop_systemd(ns)
        remove_user(name)
        for p in MADE_BY_UNIT:
            if p not in existed:
                shutil.rmtree(p, ignore_errors=True)
