"""The shipped systemd units verify once rendered; install_agent_service writes usable files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from protocol.config import load_agent_config
from tvmagent import install_service
from tvmagent.install_service import (
    AGENT_UNIT_NAME,
    COORDINATOR_UNIT_NAME,
    InstallError,
    install_agent_service,
    render_agent_unit,
    render_coordinator_unit,
)

REPO = Path(__file__).resolve().parents[2]
AGENT_TEMPLATE = REPO / "tvmagent" / "systemd" / AGENT_UNIT_NAME
COORDINATOR_TEMPLATE = REPO / "coordinator" / "systemd" / COORDINATOR_UNIT_NAME

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package `systemd`)",
)


def _executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_tvm(tmp_path: Path) -> Path:
    # a space in the directory exercises ExecStart quoting
    return _executable(tmp_path / "bin dir" / "tvm")


def _verify(unit_text: str, name: str, where: Path) -> tuple[int, str]:
    """Run `systemd-analyze verify` on a copy; return (rc, lines about our unit)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / name
    path.write_text(unit_text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on some problems (unknown values are "ignored" with a warning), so any
    # line naming our file counts as a failure too; lines about other units are not ours
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if name in line]
    return proc.returncode, "\n".join(ours)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_analyze
def test_rendered_agent_unit_verifies(fake_tvm: Path, tmp_path: Path) -> None:
    rc, ours = _verify(render_agent_unit(str(fake_tvm)), AGENT_UNIT_NAME, tmp_path / "u")
    assert (rc, ours) == (0, "")


@needs_analyze
def test_rendered_coordinator_unit_verifies(fake_tvm: Path, tmp_path: Path) -> None:
    text = render_coordinator_unit(str(fake_tvm))
    rc, ours = _verify(text, COORDINATOR_UNIT_NAME, tmp_path / "u")
    assert (rc, ours) == (0, "")


@needs_analyze
def test_verify_catches_unrendered_template(tmp_path: Path) -> None:
    # proves the check above can fail: the placeholder is not an executable
    rc, ours = _verify(AGENT_TEMPLATE.read_text(), AGENT_UNIT_NAME, tmp_path / "u")
    assert rc != 0
    assert "not executable" in ours


@needs_analyze
def test_verify_helper_catches_ignored_settings(fake_tvm: Path, tmp_path: Path) -> None:
    text = render_agent_unit(str(fake_tvm)).replace("Type=notify", "Type=notifyy")
    _, ours = _verify(text, AGENT_UNIT_NAME, tmp_path / "u")
    assert "notifyy" in ours


@pytest.mark.parametrize(
    ("template", "command", "extra"),
    [
        (AGENT_TEMPLATE, "@TVM_BIN@ agent --config /etc/tvm/agent.toml", {"Delegate": "yes"}),
        (COORDINATOR_TEMPLATE, "@TVM_BIN@ coordinator --config /etc/tvm/coordinator.toml", {}),
    ],
)
def test_shipped_units_have_the_service_contract(
    template: Path, command: str, extra: dict[str, str]
) -> None:
    d = _directives(template.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "always",
        "KillMode": "mixed",
        "StartLimitIntervalSec": "0",
        "WantedBy": "multi-user.target",
        **extra,
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert d["ExecStart"] == [command]
    assert d["WatchdogSec"][0].endswith("s")
    name = template.stem
    for key in ("StateDirectory", "RuntimeDirectory", "LogsDirectory"):
        assert d[key] == [name], key


def test_render_quotes_paths_with_spaces_and_percent(tmp_path: Path) -> None:
    exe = _executable(tmp_path / "a b%" / "tvm")
    d = _directives(render_agent_unit(str(exe), config_path="/etc/t v/agent.toml"))
    assert d["ExecStart"] == [f'"{tmp_path}/a b%%/tvm" agent --config "/etc/t v/agent.toml"']


@pytest.mark.parametrize(
    ("tvm_bin", "match"),
    [
        ("", "must not be empty"),
        ("tvm", "absolute path"),
        ("/nonexistent/tvm", "not an executable file"),
    ],
)
def test_render_rejects_bad_tvm_bin(tvm_bin: str, match: str) -> None:
    with pytest.raises(InstallError, match=match):
        render_agent_unit(tvm_bin)


def test_render_rejects_non_executable(tmp_path: Path) -> None:
    plain = tmp_path / "tvm"
    plain.write_text("not a program")
    plain.chmod(0o644)
    with pytest.raises(InstallError, match="not an executable file"):
        render_coordinator_unit(str(plain))


# --- install_agent_service ----------------------------------------------------------------


@pytest.fixture
def not_booted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install_service, "systemd_booted", lambda: False)


@pytest.mark.usefixtures("not_booted")
def test_install_writes_unit_and_private_config(fake_tvm: Path, tmp_path: Path) -> None:
    units, conf = tmp_path / "units", tmp_path / "etc" / "tvm"
    token = 'se"cr\\et ü'
    messages = install_agent_service(
        "wss://coord.example:7070/agent",
        token,
        "/srv/tvm-agent",
        unit_dir=str(units),
        config_dir=str(conf),
        tvm_bin=str(fake_tvm),
    )
    config_path = conf / "agent.toml"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    cfg = load_agent_config(str(config_path), {}, environ={})
    assert (cfg.coordinator, cfg.token, cfg.root) == (
        "wss://coord.example:7070/agent",
        token,
        "/srv/tvm-agent",
    )
    unit = (units / AGENT_UNIT_NAME).read_text()
    assert _directives(unit)["ExecStart"] == [f'"{fake_tvm}" agent --config {config_path}']
    assert stat.S_IMODE((units / AGENT_UNIT_NAME).stat().st_mode) == 0o644
    assert any("not running as PID 1" in m for m in messages)
    assert not list(conf.glob("*.tmp-*"))
    if shutil.which("systemd-analyze"):
        assert _verify(unit, AGENT_UNIT_NAME, tmp_path / "v") == (0, "")


@pytest.mark.usefixtures("not_booted")
def test_install_keeps_previous_config(fake_tvm: Path, tmp_path: Path) -> None:
    conf = tmp_path / "tvm"
    conf.mkdir()
    (conf / "agent.toml").write_text('token = "old"\n')
    messages = install_agent_service(
        "http://c:7070",
        "new",
        "/var/lib/tvm-agent",
        unit_dir=str(tmp_path / "u"),
        config_dir=str(conf),
        tvm_bin=str(fake_tvm),
    )
    assert (conf / "agent.toml.bak").read_text() == 'token = "old"\n'
    assert stat.S_IMODE((conf / "agent.toml.bak").stat().st_mode) == 0o600
    assert load_agent_config(str(conf / "agent.toml"), {}, environ={}).token == "new"
    assert any("agent.toml.bak" in m for m in messages)


@pytest.mark.usefixtures("not_booted")
def test_install_finds_tvm_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = _executable(tmp_path / "pathbin" / "tvm")
    monkeypatch.setenv("PATH", str(exe.parent))
    install_agent_service(
        "ws://c:7070",
        "t",
        "/var/lib/tvm-agent",
        unit_dir=str(tmp_path / "u"),
        config_dir=str(tmp_path / "c"),
    )
    assert f"ExecStart={exe} agent" in (tmp_path / "u" / AGENT_UNIT_NAME).read_text()


def test_install_without_tvm_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InstallError, match="cannot find the `tvm` command"):
        install_agent_service(
            "ws://c:7070", "t", "/x", unit_dir=str(tmp_path / "u"), config_dir=str(tmp_path / "c")
        )


@pytest.fixture
def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real `systemctl` stand-in on PATH that logs its arguments; fails on `enable` when
    FAKE_SYSTEMCTL_FAIL is set."""
    log = tmp_path / "systemctl.log"
    _executable(
        tmp_path / "sbin" / "systemctl",
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'if [ -n "$FAKE_SYSTEMCTL_FAIL" ] && [ "$1" = enable ]; then\n'
        '  echo "Failed to enable unit: Access denied" >&2; exit 1\n'
        "fi\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'sbin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(install_service, "systemd_booted", lambda: True)
    return log


def test_install_enables_when_systemd_runs(
    fake_tvm: Path, tmp_path: Path, fake_systemctl: Path
) -> None:
    messages = install_agent_service(
        "ws://c:7070",
        "t",
        "/var/lib/tvm-agent",
        unit_dir=str(tmp_path / "u"),
        config_dir=str(tmp_path / "c"),
        tvm_bin=str(fake_tvm),
    )
    assert fake_systemctl.read_text().splitlines() == ["daemon-reload", f"enable {AGENT_UNIT_NAME}"]
    assert any(m.startswith(f"enabled {AGENT_UNIT_NAME}") for m in messages)


def test_install_enable_false_skips_systemctl(
    fake_tvm: Path, tmp_path: Path, fake_systemctl: Path
) -> None:
    messages = install_agent_service(
        "ws://c:7070",
        "t",
        "/var/lib/tvm-agent",
        unit_dir=str(tmp_path / "u"),
        config_dir=str(tmp_path / "c"),
        tvm_bin=str(fake_tvm),
        enable=False,
    )
    assert not fake_systemctl.exists()
    assert any("not enabled" in m for m in messages)


def test_install_reports_systemctl_failure(
    fake_tvm: Path, tmp_path: Path, fake_systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAIL", "1")
    with pytest.raises(InstallError, match="systemctl enable .*Access denied"):
        install_agent_service(
            "ws://c:7070",
            "t",
            "/var/lib/tvm-agent",
            unit_dir=str(tmp_path / "u"),
            config_dir=str(tmp_path / "c"),
            tvm_bin=str(fake_tvm),
        )


@pytest.mark.parametrize(
    ("coordinator", "token", "root", "match"),
    [
        ("ftp://c:7070", "t", "/r", "must start with ws://"),
        ("", "t", "/r", "coordinator URL must not be empty"),
        ("ws://", "t", "/r", "has no host"),
        ("ws://c:99999", "t", "/r", "not a valid URL"),
        ("ws://c:7070", "", "/r", "token must not be empty"),
        ("ws://c:7070", "   ", "/r", "token must not be empty"),
        ("ws://c:7070", "a\nb", "/r", "single line"),
        ("ws://c:7070", "t", "relative/root", "root must be an absolute path"),
        ("ws://c:7070", "t", "", "root must be an absolute path"),
    ],
)
def test_install_rejects_bad_input(
    fake_tvm: Path, tmp_path: Path, coordinator: str, token: str, root: str, match: str
) -> None:
    with pytest.raises(InstallError, match=match):
        install_agent_service(
            coordinator,
            token,
            root,
            unit_dir=str(tmp_path / "u"),
            config_dir=str(tmp_path / "c"),
            tvm_bin=str(fake_tvm),
        )
    # nothing half-written
    assert not (tmp_path / "u").exists()
    assert not (tmp_path / "c").exists()


def test_install_rejects_relative_dirs(fake_tvm: Path) -> None:
    with pytest.raises(InstallError, match="unit_dir must be an absolute path"):
        install_agent_service("ws://c", "t", "/r", unit_dir="units", tvm_bin=str(fake_tvm))
    with pytest.raises(InstallError, match="config_dir must be an absolute path"):
        install_agent_service("ws://c", "t", "/r", config_dir="etc", tvm_bin=str(fake_tvm))


@pytest.mark.usefixtures("not_booted")
def test_install_into_unwritable_dir_fails_clearly(fake_tvm: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InstallError, match="cannot write"):
        install_agent_service(
            "ws://c:7070",
            "t",
            "/r",
            unit_dir=str(tmp_path / "u"),
            config_dir=str(blocker / "tvm"),
            tvm_bin=str(fake_tvm),
        )
