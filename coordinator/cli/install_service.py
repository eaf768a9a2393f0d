"""Install the coordinator as a systemd service: render the unit, write coordinator.toml once, let
the unit reach the Python that runs it, enable.

Backs ``tvm coordinator install-service``. The unit (``coordinator/systemd/tvm-coordinator.service``)
locks the rest of the system away: ``ProtectHome=yes`` hides /root and /home, ``PrivateTmp=yes``
/tmp. A `tvm` installed there (pyenv, pipx, a venv in a home directory, an editable checkout)
would fail to start with systemd's bare 203/EXEC, so the installer asks that `tvm`'s own
interpreter where its files are and writes a drop-in exposing exactly those directories,
read-only.
"""

from __future__ import annotations

import json
import os
import subprocess

from coordinator.daemon.joining import check_public_url
from coordinator.daemon.journalout import EXPORTS_FILE
from protocol.config import ConfigError, load_coordinator_config
from tvmagent import install_service as units
from tvmagent.install_service import COORDINATOR_UNIT_NAME, InstallError, render_coordinator_unit

DROP_IN = "10-tvm-paths.conf"  # in <unit dir>/tvm-coordinator.service.d/
SERVICE_DIR = "/var/lib/tvm-coordinator"  # the unit's StateDirectory and WorkingDirectory
HOMES = ("/root/", "/home/")  # ProtectHome=yes hides them
TMPS = ("/tmp/", "/var/tmp/")  # PrivateTmp=yes replaces them

# Run by the interpreter of the `tvm` being installed: where its Python and our packages live.
_WHERE = (
    "import json, os, sys\n"
    "import coordinator, protocol, tvmagent\n"
    "pkgs = [os.path.dirname(os.path.dirname(os.path.realpath(m.__file__)))"
    " for m in (coordinator, protocol, tvmagent)]\n"
    "print(json.dumps([sys.prefix, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),"
    " os.path.realpath(sys.executable), *pkgs]))\n"
)


def interpreter_of(tvm_bin: str) -> str:
    """The interpreter named on the first line of the `tvm` script."""
    try:
        with open(tvm_bin, "rb") as f:
            first = f.readline(4096)
    except OSError as exc:
        raise InstallError(f"cannot read {tvm_bin}: {exc.strerror}") from exc
    if not first.startswith(b"#!"):
        raise InstallError(f"{tvm_bin} is not a Python entry-point script (no #! line)")
    words = first[2:].decode(errors="replace").split()
    if not words or not os.path.isabs(words[0]) or os.path.basename(words[0]) == "env":
        raise InstallError(
            f"{tvm_bin} does not name its interpreter by absolute path ({first.decode().strip()!r});"
            " install tvm with pip into a virtual environment"
        )
    return words[0]


def paths_used_by(tvm_bin: str) -> list[str]:
    """The directories the service reads to run `tvm_bin`: its script, its environment, the base
    Python and the packages' source (an editable install's checkout)."""
    python = interpreter_of(tvm_bin)
    try:
        proc = subprocess.run(
            [python, "-I", "-c", _WHERE], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        raise InstallError(f"cannot run {python} (the interpreter of {tvm_bin}): {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InstallError(f"{python} (the interpreter of {tvm_bin}) cannot import tvm: {detail}")
    found: list[str] = json.loads(proc.stdout)
    return [os.path.dirname(os.path.realpath(tvm_bin)), os.path.dirname(python), *found]


def exposure(paths: list[str]) -> tuple[list[str], list[str]]:
    """([Service] lines that let the unit read `paths`, warnings). Pure (raises InstallError for a
    path no unit file can hold)."""
    binds: list[str] = []
    lines: list[str] = []
    warnings: list[str] = []
    for p in paths:
        if any(c in p for c in "\n\r\0"):
            raise InstallError(f"the unit cannot name a path with control characters: {p!r}")
        p = os.path.normpath(p)
        if p.startswith(HOMES) and not any(p == b or p.startswith(b + "/") for b in binds):
            binds = [b for b in binds if not b.startswith(p + "/")] + [p]
        if p.startswith(TMPS) and "PrivateTmp=no" not in lines:
            lines.append("PrivateTmp=no")
            warnings.append(
                f"warning: the service reads {p}, under /tmp: it gets no private /tmp, and a"
                " reboot may delete what it reads (prefer /opt for tvm, /etc/tvm for its config)"
            )
    if binds:
        lines += ["ProtectHome=tmpfs", *(f"BindReadOnlyPaths={_quote(b)}" for b in sorted(binds))]
    return lines, warnings


def _quote(path: str) -> str:
    if any(c in path for c in " \t\"'\\%"):
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'
    return path


def coordinator_toml(host: str, port: int, public_url: str) -> str:
    text = (
        "# Written by `tvm coordinator install-service`; keys are documented in"
        " protocol/config.py.\n"
        f"host = {units.toml_string(host)}\n"
        f"port = {port}\n"
    )
    return text + (f"public-url = {units.toml_string(public_url)}\n" if public_url else "")


def install_coordinator_service(
    *,
    host: str | None = None,
    port: int | None = None,
    public_url: str | None = None,
    unit_dir: str = "/etc/systemd/system",
    config_dir: str = "/etc/tvm",
    tvm_bin: str | None = None,
    enable: bool = True,
) -> list[str]:
    """Write the coordinator unit, its drop-in when `tvm` lives where the unit cannot see, and
    coordinator.toml (0600) unless one exists; enable the unit when systemd runs. Returns what was
    done, line by line. Raises InstallError for bad input or a failed step (nothing written then,
    for bad input)."""
    if host is not None and (not host.strip() or any(c in host for c in '\n\r\0"\\ ')):
        raise InstallError(f"host must be an address or name, got {host!r}")
    if port is not None and not 1 <= port <= 65535:
        raise InstallError(f"port must be 1..65535, got {port}")
    if public_url and (why := check_public_url(public_url)):
        raise InstallError(why)
    tvm_bin = units.check_places(unit_dir, config_dir, tvm_bin)
    config_path = os.path.join(config_dir, "coordinator.toml")
    unit_text = render_coordinator_unit(tvm_bin, config_path=config_path)
    keep = os.path.exists(config_path)
    if keep and (host, port, public_url) != (None, None, None):
        raise InstallError(
            f"{config_path} exists: edit it (host, port, public-url), or remove it to have it"
            " written from --host, --port and --public-url"
        )
    lines, messages = exposure([*paths_used_by(tvm_bin), config_dir])
    drop_dir = os.path.join(unit_dir, COORDINATOR_UNIT_NAME + ".d")
    drop_in = os.path.join(drop_dir, DROP_IN)
    try:
        os.makedirs(config_dir, mode=0o755, exist_ok=True)
        os.makedirs(unit_dir, mode=0o755, exist_ok=True)
        if keep:
            messages.append(f"kept {config_path}")
        else:
            text = coordinator_toml(host or "127.0.0.1", port or 7070, public_url or "")
            units.write_atomic(config_path, text, 0o600)
            messages.append(f"wrote {config_path} (mode 0600)")
        try:  # what the service will read must load
            cfg = load_coordinator_config(config_path, {}, environ={})
        except ConfigError as exc:
            raise InstallError(f"{config_path} does not load: {exc}") from exc
        unit_path = os.path.join(unit_dir, COORDINATOR_UNIT_NAME)
        units.write_atomic(unit_path, unit_text, 0o644)
        messages.append(f"wrote {unit_path}")
        if lines:
            os.makedirs(drop_dir, mode=0o755, exist_ok=True)
            why = "# Written by `tvm coordinator install-service`: where this tvm's files are.\n"
            units.write_atomic(drop_in, why + "[Service]\n" + "\n".join(lines) + "\n", 0o644)
            messages.append(f"wrote {drop_in} (the unit may read: {', '.join(lines)})")
        elif os.path.exists(drop_in):  # an earlier install's tvm lived there; this one does not
            os.unlink(drop_in)
            messages.append(f"removed {drop_in}")
    except OSError as exc:
        raise InstallError(f"cannot write {exc.filename or 'files'}: {exc.strerror}") from exc
    messages.append(units.enable_unit(COORDINATOR_UNIT_NAME, enable))
    state = os.path.join(SERVICE_DIR, cfg.state_dir)  # relative: to the unit's WorkingDirectory
    messages.append(
        "once it runs, its URL, account key and join token are in"
        f" {os.path.normpath(os.path.join(state, EXPORTS_FILE))} (0600)"
    )
    return messages
