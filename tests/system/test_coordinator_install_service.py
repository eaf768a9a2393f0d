"""`tvm coordinator install-service`: the unit, a 0600 coordinator.toml written once, and the
drop-in that lets the unit read a `tvm` kept where it hides (/root, /home, /tmp). The unit itself,
installed this way, runs under a real systemd in test_coordinator_unit_systemd.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import install_service as coord_install
from coordinator.cli.install_service import (
    DROP_IN,
    exposure,
    install_coordinator_service,
    interpreter_of,
)
from protocol.config import load_coordinator_config
from tests.system.test_systemd_units import _executable
from tvmagent import install_service
from tvmagent.install_service import AGENT_UNIT_NAME, COORDINATOR_UNIT_NAME, InstallError

TVM = os.path.join(os.path.dirname(sys.executable), "tvm")


@pytest.fixture
def tvm_here(tmp_path: Path) -> Path:
    """A `tvm` entry point run by this interpreter (so it imports these packages), kept under /tmp."""
    return _executable(
        tmp_path / "bin" / "tvm", f"#!{sys.executable}\nfrom coordinator.cli import main\nmain()\n"
    )


@pytest.fixture(autouse=True)
def not_booted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install_service, "systemd_booted", lambda: False)


def _dirs(tmp_path: Path) -> dict[str, str]:
    return {"unit_dir": str(tmp_path / "units"), "config_dir": str(tmp_path / "etc")}


def test_install_writes_the_unit_a_private_config_and_what_the_unit_may_read(
    tvm_here: Path, tmp_path: Path
) -> None:
    said = install_coordinator_service(
        host="0.0.0.0",
        port=7171,
        public_url="https://batch.example:7171",
        tvm_bin=str(tvm_here),
        **_dirs(tmp_path),
    )
    config = tmp_path / "etc" / "coordinator.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    cfg = load_coordinator_config(str(config), {}, environ={})
    assert (cfg.host, cfg.port, cfg.public_url) == ("0.0.0.0", 7171, "https://batch.example:7171")
    unit = (tmp_path / "units" / COORDINATOR_UNIT_NAME).read_text()
    assert f"ExecStart={tvm_here} coordinator --config {config}" in unit
    drop_in = (tmp_path / "units" / f"{COORDINATOR_UNIT_NAME}.d" / DROP_IN).read_text()
    # the script and the config are under /tmp: the service keeps the host's /tmp, and says why
    assert "PrivateTmp=no" in drop_in
    assert any(line.startswith("warning:") and "/tmp" in line for line in said)
    # whatever of this interpreter lives under a home directory is bound read-only, nothing wider
    homes = [
        p
        for p in (sys.prefix, os.path.realpath(sys.base_prefix))
        if p.startswith(("/root/", "/home/"))
    ]
    for p in homes:
        assert f"BindReadOnlyPaths={p}" in drop_in
    assert ("ProtectHome=tmpfs" in drop_in) == bool(homes)
    assert "BindReadOnlyPaths=/root\n" not in drop_in
    assert any("not running as PID 1" in line for line in said)
    assert said[-1] == (
        "once it runs, its URL, account key and join token are in"
        " /var/lib/tvm-coordinator/tvm-state/exports.env (0600)"
    )
    assert not list((tmp_path / "etc").glob("*.tmp-*"))


def test_an_existing_config_is_kept_and_options_for_a_new_one_are_refused(
    tvm_here: Path, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "coordinator.toml").write_text('port = 7272\naccount = "mine"\n')
    said = install_coordinator_service(tvm_bin=str(tvm_here), **_dirs(tmp_path))
    assert (etc / "coordinator.toml").read_text() == 'port = 7272\naccount = "mine"\n'
    assert f"kept {etc / 'coordinator.toml'}" in said
    with pytest.raises(InstallError, match="exists: edit it"):
        install_coordinator_service(port=7373, tvm_bin=str(tvm_here), **_dirs(tmp_path))
    assert (etc / "coordinator.toml").read_text() == 'port = 7272\naccount = "mine"\n'


def test_a_config_that_does_not_load_stops_the_install(tvm_here: Path, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "coordinator.toml").write_text("prot = 7272\n")
    with pytest.raises(InstallError, match="does not load"):
        install_coordinator_service(tvm_bin=str(tvm_here), **_dirs(tmp_path))
    assert not (tmp_path / "units" / COORDINATOR_UNIT_NAME).exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": ""}, "host must be an address"),
        ({"host": "a b"}, "host must be an address"),
        ({"host": 'x"\ny'}, "host must be an address"),
        ({"port": 0}, "port must be 1..65535"),
        ({"port": 70000}, "port must be 1..65535"),
        ({"public_url": "ftp://batch.example"}, "public-url must be the http"),
        ({"unit_dir": "units"}, "unit_dir must be an absolute path"),
        ({"config_dir": "etc"}, "config_dir must be an absolute path"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(
    tvm_here: Path, tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {**_dirs(tmp_path), "tvm_bin": str(tvm_here), **kwargs}
    with pytest.raises(InstallError, match=match):
        install_coordinator_service(**args)  # type: ignore[arg-type]
    assert not (tmp_path / "units").exists()
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize(
    ("first_line", "match"),
    [
        ("#!/usr/bin/env python3\n", "does not name its interpreter by absolute path"),
        ("import sys\n", "not a Python entry-point script"),
    ],
)
def test_a_tvm_without_a_usable_interpreter_line_is_refused(
    tmp_path: Path, first_line: str, match: str
) -> None:
    tvm = _executable(tmp_path / "tvm", first_line + "print('hi')\n")
    with pytest.raises(InstallError, match=match):
        install_coordinator_service(tvm_bin=str(tvm), **_dirs(tmp_path))
    assert not (tmp_path / "units").exists()


def test_a_tvm_whose_interpreter_cannot_import_it_is_refused(tmp_path: Path) -> None:
    python = _executable(
        tmp_path / "py" / "python",
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'coordinator'\" >&2\nexit 1\n",
    )
    tvm = _executable(tmp_path / "tvm", f"#!{python}\n")
    assert interpreter_of(str(tvm)) == str(python)
    with pytest.raises(InstallError, match="cannot import tvm: ModuleNotFoundError"):
        install_coordinator_service(tvm_bin=str(tvm), **_dirs(tmp_path))
    assert not (tmp_path / "units").exists()


def test_exposure_binds_only_what_is_hidden_once_each() -> None:
    lines, warnings = exposure(
        [
            "/opt/tvm/bin",
            "/root/.pyenv/versions/3.11.7",
            "/root/.pyenv/versions/3.11.7/bin",  # inside one bound already
            "/home/alice/src/tvm batch",
            "/home/alice",  # wider: replaces what it holds
            "/usr/lib/python3.11",
        ]
    )
    assert lines == [
        "ProtectHome=tmpfs",
        "BindReadOnlyPaths=/home/alice",
        "BindReadOnlyPaths=/root/.pyenv/versions/3.11.7",
    ]
    assert warnings == []
    assert exposure(["/opt/tvm", "/usr/local/lib"]) == ([], [])
    lines, warnings = exposure(["/tmp/x/.venv", "/var/tmp/y", "/home/bob/a b%"])
    assert lines == ["PrivateTmp=no", "ProtectHome=tmpfs", 'BindReadOnlyPaths="/home/bob/a b%%"']
    assert len(warnings) == 1
    with pytest.raises(InstallError, match="control characters"):
        exposure(["/home/x\nExecStartPre=/bin/evil"])


def test_a_drop_in_no_longer_needed_is_removed(
    tvm_here: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_coordinator_service(tvm_bin=str(tvm_here), **_dirs(tmp_path))
    drop_in = tmp_path / "units" / f"{COORDINATOR_UNIT_NAME}.d" / DROP_IN
    assert drop_in.exists()
    # reinstalled from a tvm kept where the unit sees it (/opt, say): nothing to expose any more
    monkeypatch.setattr(coord_install, "exposure", lambda _paths: ([], []))
    said = install_coordinator_service(tvm_bin=str(tvm_here), **_dirs(tmp_path))
    assert not drop_in.exists()
    assert f"removed {drop_in}" in said
    assert (tmp_path / "units" / COORDINATOR_UNIT_NAME).exists()


def test_the_command_installs_the_tvm_it_was_started_as(tmp_path: Path) -> None:
    """`tvm coordinator install-service` and `tvm agent install-service` write units that run the
    `tvm` they were started as, even when no `tvm` is on PATH."""
    if not os.access(TVM, os.X_OK):
        pytest.skip(f"no `tvm` command beside {sys.executable}")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TVM_AGENT_TOKEN": "t"}
    places = ["--unit-dir", str(tmp_path / "u"), "--config-dir", str(tmp_path / "c")]

    def tvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TVM, *args, *places], capture_output=True, text=True, timeout=120, env=env, check=False
        )

    out = tvm("coordinator", "install-service", "--port", "7474")
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'c' / 'coordinator.toml'} (mode 0600)" in out.stdout
    assert f"ExecStart={TVM} coordinator" in (tmp_path / "u" / COORDINATOR_UNIT_NAME).read_text()
    out = tvm("agent", "install-service", "--coordinator", "ws://127.0.0.1:7474/agent")
    assert out.returncode == 0, out.stderr
    assert f"ExecStart={TVM} agent" in (tmp_path / "u" / AGENT_UNIT_NAME).read_text()
    again = tvm("coordinator", "install-service", "--host", "0.0.0.0")
    assert again.returncode == 1
    assert "coordinator.toml exists: edit it" in again.stderr
    # An option of the coordinator itself, put before the subcommand, is refused, not dropped.
    before = subprocess.run(
        [TVM, "coordinator", "--port", "7575", "install-service", *places],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert before.returncode == 2
    assert "--port: options of the coordinator" in before.stderr
