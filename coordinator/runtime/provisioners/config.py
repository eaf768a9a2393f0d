"""The coordinator TOML's `[provisioner]` section: named provisioners, each with its own schema.

```toml
[provisioner]
default = "lab"            # optional: pools that name no provisioner use this one

[provisioner.lab]
type = "ssh"
[[provisioner.lab.hosts]]
address = "10.0.0.5"
user = "root"
key-file = "/etc/tvm/id_ed25519"
tvm = "/opt/tvm/bin/tvm"

[provisioner.hpc]
type = "slurm"
partition = "batch"
time-limit = "PT2H"
```

A pool picks its provisioner with the metadata item `provisioner` (`tvm pool add --metadata
provisioner=lab`, or `metadata: [{name: "provisioner", value: "lab"}]`). Every error names the
provisioner and the key, and nothing is started until the whole section is valid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from coordinator.common.timeutil import parse_duration
from coordinator.core.store import POOL_PROVISIONER_KEY

__all__ = [
    "K8sSpec",
    "ProvisionerConfigError",
    "ProvisionersConfig",
    "SlurmSpec",
    "SshHost",
    "SshSpec",
    "parse_provisioners",
]

POOL_METADATA_KEY = POOL_PROVISIONER_KEY
# no '-': an agent's id is `<provisioner>-...`, and its first part names its provisioner
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,31}$")
RESERVED = ("local",)  # the local provisioner's agents are `local-N`
# a Slurm partition/account, a user name, a host: no shell or option syntax can hide in them
# (no leading '-': `-oProxyCommand...@host` would be an ssh option)
_WORD_RE = re.compile(r"^[A-Za-z0-9_.:%+][A-Za-z0-9_.@:%+-]{0,254}$")


class ProvisionerConfigError(ValueError):
    """A `[provisioner]` value is missing, unknown or out of range; the message names it."""


class _Spec(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class SshHost(_Spec):
    address: str
    user: str = "root"
    port: int = 22
    key_file: str = ""
    # known_hosts file; empty: accept a new host key on first contact, refuse a changed one
    known_hosts: str = ""
    # the `tvm` command on the host, or a venv to create there (`python3 -m venv` + pip install)
    tvm: str = ""
    venv: str = ""
    pip_spec: str = "tvm-batch"
    python: str = "python3"  # what makes the venv (a path where the host's python3 is too old)
    # where each agent's directory (token, private dir, TVM root, log) goes on the host
    agent_dir: str = "/var/lib/tvm-ssh"
    max_agents: int = 1
    # "auto": a transient systemd unit where systemd runs (for a non-root user, a unit of its
    # user manager if it lingers), a plain process otherwise
    mode: Literal["auto", "process", "systemd"] = "auto"


class SshSpec(_Spec):
    type: Literal["ssh"]
    hosts: list[SshHost]
    # agents dial this (default: the coordinator's public agent URL)
    coordinator_url: str = ""
    # a free agent of this provisioner no pool needs is stopped and wiped after this many seconds
    idle_stop_after: float = 5.0
    connect_timeout: int = 10
    # an unreachable host is not tried again for this many seconds
    retry_after: float = 60.0
    # a host's venv (python3 -m venv + pip install) must be ready within this many seconds
    install_timeout: float = 900.0


class SlurmSpec(_Spec):
    type: Literal["slurm"]
    partition: str = ""
    account: str = ""
    # the allocation's wall time (ISO 8601 like PT1H or Slurm's [D-]HH:MM:SS); the agent stops
    # a minute before it so its tasks are requeued by a clean leave, not a kill
    time_limit: str = "PT1H"
    tvm: str = "tvm"
    # a directory every compute node sees at the same path (scripts, token file, agent roots)
    work_dir: str = ""
    coordinator_url: str = ""
    max_pending: int = 4  # allocations waiting in the queue at once
    max_jobs: int = 32  # allocations queued or running at once
    max_failures: int = 3  # allocations in a row that end before their agent joins: pause
    extra_args: list[str] = []
    idle_stop_after: float = 5.0
    bin_dir: str = ""  # where sbatch/squeue/scancel are; empty: PATH
    slurm_conf: str = ""  # SLURM_CONF for those commands; empty: Slurm's own default


class K8sSpec(_Spec):
    type: Literal["kubernetes"]
    namespace: str = "default"
    image: str = "tvm-batch:latest"
    coordinator_url: str = ""
    replicas: int = 1
    kind: Literal["StatefulSet", "Job"] = "StatefulSet"
    service_account: str = ""


Spec = SshSpec | SlurmSpec | K8sSpec


class ProvisionersConfig(msgspec.Struct):
    named: dict[str, Spec]
    default: str = ""


_TYPES: dict[str, type[_Spec]] = {"ssh": SshSpec, "slurm": SlurmSpec, "kubernetes": K8sSpec}


def parse_provisioners(table: Mapping[str, Any], source: str = "config") -> ProvisionersConfig:
    """Validate the `[provisioner]` table; ProvisionerConfigError says what and where."""
    if not isinstance(table, Mapping):
        raise ProvisionerConfigError(f"{source}: `provisioner` must be a table")
    named: dict[str, Spec] = {}
    default = table.get("default", "")
    if not isinstance(default, str):
        raise ProvisionerConfigError(f"{source}: `provisioner.default` must be a provisioner name")
    for name, body in table.items():
        if name == "default":
            continue
        where = f"{source}: [provisioner.{name}]"
        if not _NAME_RE.match(name) or name in RESERVED:
            raise ProvisionerConfigError(
                f"{where}: a provisioner name is 1-32 letters, digits or '_' (not"
                f" {', '.join(RESERVED)}): agents it starts are named `<name>-...`"
            )
        if not isinstance(body, Mapping):
            raise ProvisionerConfigError(f"{where}: must be a table with a `type`")
        kind = body.get("type")
        cls = _TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProvisionerConfigError(
                f"{where}: `type` must be one of {', '.join(sorted(_TYPES))}, got {kind!r}"
            )
        try:
            spec = msgspec.convert(dict(body), cls)
        except msgspec.ValidationError as exc:
            raise ProvisionerConfigError(f"{where}: {_explain(exc)}") from None
        _check(spec, where)  # type: ignore[arg-type]
        named[name] = spec  # type: ignore[assignment]
    if default and default not in named:
        raise ProvisionerConfigError(
            f"{source}: `provisioner.default` names {default!r}, which is not defined"
            f" (defined: {', '.join(sorted(named)) or 'none'})"
        )
    return ProvisionersConfig(named, default)


def _explain(exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    m = re.match(r"^Object contains unknown field `([^`]*)`(?: - at `\$(.*)`)?$", msg)
    if m:
        at = f" in `{m[2].lstrip('.')}`" if m[2] else ""
        return f"unknown key `{m[1]}`{at}"
    m = re.match(r"^Object missing required field `([^`]*)`(?: - at `\$(.*)`)?$", msg)
    if m:
        at = f" in `{m[2].lstrip('.')}`" if m[2] else ""
        return f"missing key `{m[1]}`{at}"
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", msg)
    if m:
        return f"`{m[2]}`: {m[1]}"
    return msg


def _check_url(where: str, url: str) -> None:
    if url and not re.match(r"^(ws|wss|http|https)://[^\s'\"\\]+$", url):
        raise ProvisionerConfigError(f"{where}: `coordinator-url` is not a ws(s):// or http(s) URL")


def _positive(where: str, key: str, value: float) -> None:
    if not value > 0:
        raise ProvisionerConfigError(f"{where}: `{key}` must be positive, got {value}")


def _path(where: str, key: str, value: str, *, required: bool = False) -> None:
    if required and not value:
        raise ProvisionerConfigError(f"{where}: `{key}` is required")
    if value and (not value.startswith("/") or re.search(r"[\s'\"\\$`;&|<>]", value)):
        raise ProvisionerConfigError(
            f"{where}: `{key}` must be an absolute path without spaces or shell characters,"
            f" got {value!r}"
        )


def _check(spec: Spec, where: str) -> None:
    _check_url(where, spec.coordinator_url)
    if isinstance(spec, SshSpec):
        if not spec.hosts:
            raise ProvisionerConfigError(f"{where}: `hosts` must list at least one host")
        _positive(where, "idle-stop-after", spec.idle_stop_after)
        _positive(where, "retry-after", spec.retry_after)
        _positive(where, "connect-timeout", spec.connect_timeout)
        _positive(where, "install-timeout", spec.install_timeout)
        for i, h in enumerate(spec.hosts):
            at = f"{where} hosts[{i}] ({h.address})"
            if not _WORD_RE.match(h.address):
                raise ProvisionerConfigError(f"{at}: `address` is not a host name or address")
            if not _WORD_RE.match(h.user):
                raise ProvisionerConfigError(f"{at}: `user` is not a user name: {h.user!r}")
            if not 1 <= h.port <= 65535:
                raise ProvisionerConfigError(f"{at}: `port` must be in 1..65535, got {h.port}")
            if h.max_agents < 1:
                raise ProvisionerConfigError(f"{at}: `max-agents` must be at least 1")
            if bool(h.tvm) == bool(h.venv):
                raise ProvisionerConfigError(
                    f"{at}: give exactly one of `tvm` (the command's path on the host) and `venv`"
                    " (a virtual environment to create there)"
                )
            _path(at, "tvm", h.tvm)
            _path(at, "venv", h.venv)
            if h.python != "python3":
                _path(at, "python", h.python)
            _path(at, "agent-dir", h.agent_dir, required=True)
            _path(at, "key-file", h.key_file)
            _path(at, "known-hosts", h.known_hosts)
            # a requirement (`tvm-batch==0.1.0`, `tvm-batch[postgres]`) or a path on the host
            if not re.match(
                r"^([A-Za-z0-9][A-Za-z0-9_.=<>~!\[\],+-]*|/[A-Za-z0-9_./+-]*(\[[A-Za-z0-9_,-]+\])?)$",
                h.pip_spec,
            ):
                raise ProvisionerConfigError(
                    f"{at}: `pip-spec` is not a pip requirement or an absolute path: {h.pip_spec!r}"
                )
    elif isinstance(spec, SlurmSpec):
        for key in ("partition", "account"):
            value = getattr(spec, key)
            if value and not _WORD_RE.match(value):
                raise ProvisionerConfigError(f"{where}: `{key}` is not a Slurm name: {value!r}")
        slurm_time(spec.time_limit, where)
        _path(where, "work-dir", spec.work_dir, required=True)
        _path(where, "bin-dir", spec.bin_dir)
        _path(where, "slurm-conf", spec.slurm_conf)
        if spec.tvm != "tvm":
            _path(where, "tvm", spec.tvm)
        for key in ("max-pending", "max-jobs", "max-failures"):
            if getattr(spec, key.replace("-", "_")) < 1:
                raise ProvisionerConfigError(f"{where}: `{key}` must be at least 1")
        _positive(where, "idle-stop-after", spec.idle_stop_after)
        for arg in spec.extra_args:
            if not arg.startswith("--") or "\n" in arg:
                raise ProvisionerConfigError(
                    f"{where}: `extra-args` holds sbatch options like --qos=high, got {arg!r}"
                )
    else:
        if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", spec.namespace):
            raise ProvisionerConfigError(f"{where}: `namespace` is not a Kubernetes name")
        if spec.replicas < 0:
            raise ProvisionerConfigError(f"{where}: `replicas` must be 0 or more")
        if not spec.image or any(c.isspace() for c in spec.image):
            raise ProvisionerConfigError(f"{where}: `image` must be an image reference")


def slurm_time(text: str, where: str = "") -> int:
    """A time limit as whole minutes: ISO 8601 (`PT1H30M`) or Slurm's `[D-]HH:MM[:SS]` / minutes."""
    prefix = f"{where}: " if where else ""
    seconds: float | None = None
    m = re.match(r"^(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?$", text)
    if m:
        days, hours, minutes, secs = (int(x or 0) for x in m.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    elif text.isdigit():
        seconds = int(text) * 60
    else:
        try:
            seconds = parse_duration(text, "time-limit")
        except Exception:  # noqa: BLE001 - the REST error type; said again below in config terms
            seconds = None
    if seconds is None or seconds < 120:
        raise ProvisionerConfigError(
            f"{prefix}`time-limit` must be at least 2 minutes, as PT1H or [D-]HH:MM:SS,"
            f" got {text!r}"
        )
    return int(seconds // 60)
