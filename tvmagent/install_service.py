"""Install the agent as a systemd service: render the unit, write agent.toml, enable.

Backs ``tvm agent install-service``. The unit templates ship in the packages
(``tvmagent/systemd``, ``coordinator/systemd``) with ``@TVM_BIN@`` standing for the absolute
path of the ``tvm`` command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources

from protocol.config import ConfigError, load_agent_config, validate_coordinator_url

__all__ = [
    "AGENT_UNIT_NAME",
    "COORDINATOR_UNIT_NAME",
    "InstallError",
    "check_places",
    "enable_unit",
    "install_agent_service",
    "render_agent_unit",
    "render_coordinator_unit",
    "running_tvm",
    "toml_string",
    "write_atomic",
]

AGENT_UNIT_NAME = "tvm-agent.service"
COORDINATOR_UNIT_NAME = "tvm-coordinator.service"
PLACEHOLDER = "@TVM_BIN@"
DEFAULT_AGENT_CONFIG = "/etc/tvm/agent.toml"
DEFAULT_COORDINATOR_CONFIG = "/etc/tvm/coordinator.toml"


class InstallError(Exception):
    """Bad install input, or a step of the installation failed."""


def _template(package: str, name: str) -> str:
    return (resources.files(package) / "systemd" / name).read_text(encoding="utf-8")


def _check_exec_path(path: str, what: str) -> None:
    if not path:
        raise InstallError(f"{what} must not be empty")
    if not os.path.isabs(path):
        raise InstallError(f"{what} must be an absolute path, got {path!r}")
    if any(c in path for c in "\n\r\0"):
        raise InstallError(f"{what} must not contain control characters: {path!r}")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise InstallError(f"{what} is not an executable file: {path}")


def _unit_quote(word: str) -> str:
    """Quote one ExecStart= word: systemd expands % specifiers and $VARS, and splits on spaces."""
    word = word.replace("%", "%%").replace("$", "$$")
    if any(c in word for c in " \t\"'\\"):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _render(template: str, tvm_bin: str, default_config: str, config_path: str) -> str:
    _check_exec_path(tvm_bin, "tvm_bin")
    if not os.path.isabs(config_path) or any(c in config_path for c in "\n\r\0"):
        raise InstallError(f"config path must be an absolute path, got {config_path!r}")
    text = template.replace(PLACEHOLDER, _unit_quote(tvm_bin))
    return text.replace(f"--config {default_config}", f"--config {_unit_quote(config_path)}")


def render_agent_unit(tvm_bin: str, *, config_path: str = DEFAULT_AGENT_CONFIG) -> str:
    """The agent unit with ExecStart pointing at ``tvm_bin`` and ``config_path``."""
    return _render(
        _template("tvmagent", AGENT_UNIT_NAME), tvm_bin, DEFAULT_AGENT_CONFIG, config_path
    )


def render_coordinator_unit(tvm_bin: str, *, config_path: str = DEFAULT_COORDINATOR_CONFIG) -> str:
    """The coordinator unit with ExecStart pointing at ``tvm_bin`` and ``config_path``."""
    return _render(
        _template("coordinator", COORDINATOR_UNIT_NAME),
        tvm_bin,
        DEFAULT_COORDINATOR_CONFIG,
        config_path,
    )


def toml_string(value: str) -> str:
    """A TOML basic string (no tomli_w dependency for three keys)."""
    out = []
    for c in value:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def agent_toml(coordinator: str, token: str, root: str) -> str:
    return (
        "# Written by `tvm agent install-service`; keys are documented in protocol/config.py.\n"
        f"coordinator = {toml_string(coordinator)}\n"
        f"token = {toml_string(token)}\n"
        f"root = {toml_string(root)}\n"
    )


def write_atomic(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    # created with the final mode, so the token is never readable by others, even briefly
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def running_tvm() -> str | None:
    """The `tvm` command this process was started as (an absolute path), so a unit installed by
    `/opt/tvm/bin/tvm ... install-service` runs that one; None when started otherwise (`python -m`):
    the installer then looks for `tvm` on PATH."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != "tvm":
        return None
    path = os.path.abspath(shutil.which(argv0) or argv0)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def systemd_booted() -> bool:
    """True when systemd is PID 1 (the check sd_booted(3) uses)."""
    return os.path.isdir("/run/systemd/system")


def _systemctl(*args: str) -> None:
    exe = shutil.which("systemctl")
    if exe is None:
        raise InstallError("systemd is running but `systemctl` is not on PATH")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise InstallError(f"`systemctl {' '.join(args)}` failed ({proc.returncode}): {detail}")


def enable_unit(name: str, enable: bool) -> str:
    """Enable unit `name` where systemd runs (daemon-reload first); what was done, or what to run."""
    if not enable:
        return f"not enabled (enable=False); run: systemctl enable --now {name}"
    if not systemd_booted():
        return (
            "systemd is not running as PID 1 here, so the unit was not enabled; on a systemd "
            f"host run: systemctl daemon-reload && systemctl enable --now {name}"
        )
    _systemctl("daemon-reload")
    _systemctl("enable", name)
    return f"enabled {name}; start it with: systemctl start {name}"


def check_places(unit_dir: str, config_dir: str, tvm_bin: str | None) -> str:
    """Both directories absolute; the `tvm` to run (`tvm_bin`, else the one on PATH)."""
    for what, d in (("unit_dir", unit_dir), ("config_dir", config_dir)):
        if not d or not os.path.isabs(d):
            raise InstallError(f"{what} must be an absolute path, got {d!r}")
    if tvm_bin is None:
        found = shutil.which("tvm")
        if found is None:
            raise InstallError("cannot find the `tvm` command on PATH; pass its absolute path")
        tvm_bin = os.path.abspath(found)
    return tvm_bin


def install_agent_service(
    coordinator: str,
    token: str,
    root: str,
    *,
    unit_dir: str = "/etc/systemd/system",
    config_dir: str = "/etc/tvm",
    tvm_bin: str | None = None,
    enable: bool = True,
) -> list[str]:
    """Write the agent unit and a 0600 agent.toml; enable the unit when systemd runs.

    ``tvm_bin`` defaults to ``tvm`` found on PATH. Returns human-readable messages about
    what was done. Raises InstallError for bad input or a failed step.
    """
    why = validate_coordinator_url(coordinator)
    if why:
        raise InstallError(f"coordinator URL {why}")
    if not token or not token.strip():
        raise InstallError("token must not be empty")
    if any(c in token for c in "\n\r\0"):
        raise InstallError("token must be a single line")
    if not root or not os.path.isabs(root):
        raise InstallError(f"root must be an absolute path, got {root!r}")
    tvm_bin = check_places(unit_dir, config_dir, tvm_bin)
    config_path = os.path.join(config_dir, "agent.toml")
    unit_text = render_agent_unit(tvm_bin, config_path=config_path)
    config_text = agent_toml(coordinator, token, root)
    messages: list[str] = []

    try:
        os.makedirs(config_dir, mode=0o755, exist_ok=True)
        os.makedirs(unit_dir, mode=0o755, exist_ok=True)
        if os.path.exists(config_path):
            backup = config_path + ".bak"
            shutil.copy2(config_path, backup)
            os.chmod(backup, 0o600)
            messages.append(f"kept the previous {config_path} as {backup}")
        write_atomic(config_path, config_text, 0o600)
        messages.append(f"wrote {config_path} (mode 0600)")
        # read it back through the real loader: what we wrote must be what the agent reads
        try:
            load_agent_config(config_path, {}, environ={})
        except ConfigError as exc:
            raise InstallError(f"the written config does not load: {exc}") from exc
        unit_path = os.path.join(unit_dir, AGENT_UNIT_NAME)
        write_atomic(unit_path, unit_text, 0o644)
        messages.append(f"wrote {unit_path}")
    except OSError as exc:
        raise InstallError(f"cannot write {exc.filename or 'files'}: {exc.strerror}") from exc

    if root.startswith(("/usr/", "/boot/", "/efi/")):
        messages.append(
            f"warning: root {root} is read-only for the service (ProtectSystem=yes); "
            "prefer a path under /var/lib or /srv"
        )
    messages.append(enable_unit(AGENT_UNIT_NAME, enable))
    return messages
