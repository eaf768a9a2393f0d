"""Agent and coordinator configuration: TOML file, environment and CLI flags.

Precedence (lowest first): field defaults < TOML file < environment
(``TVM_AGENT_<KEY>`` / ``TVM_COORDINATOR_<KEY>``, key in upper snake case) < overrides
(CLI flags, keyed by Python field name; ``None`` means "flag not given").

TOML keys are kebab-case (``heartbeat-interval``). Every error is a ``ConfigError`` whose
message names where the bad value came from (file, environment variable or option) and the key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "AgentConfig",
    "ConfigError",
    "CoordinatorConfig",
    "LogFormat",
    "LogLevel",
    "load_agent_config",
    "load_coordinator_config",
    "validate_coordinator_url",
]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "console"]

AGENT_ENV_PREFIX = "TVM_AGENT_"
COORDINATOR_ENV_PREFIX = "TVM_COORDINATOR_"


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range.

    ``source`` is the file path, environment variable or option the bad value came from;
    ``key`` is the TOML (kebab-case) key, when the error concerns one key.
    """

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.key = key


class _Config(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class AgentConfig(_Config):
    # ws:// or wss:// URL of the agent link, or an http(s) base URL of the coordinator
    coordinator: str = ""
    # the join token: prefer TVM_AGENT_TOKEN or token-file; here only in a 0600 config file
    token: str = ""
    token_file: str = ""
    root: str = "/var/lib/tvm-agent"
    # agent-id and credential, 0700; empty: ROOT.private beside the root (tvmagent/layout.py)
    private_dir: str = ""
    # agent id; empty means "generate one and persist it under root"
    name: str = ""
    heartbeat_interval: float = 5.0
    reconnect_max_backoff: float = 30.0
    ca_file: str = ""
    port_range_low: int = 20000
    port_range_high: int = 29999
    drain_grace: float = 60.0
    # how often expired task directories (retentionTime) are looked for and deleted
    retention_sweep_interval: float = 20.0
    # run tasks as this user; empty means the agent's own user
    task_user: str = ""
    # "users": one unprivileged user per running task (root agents); "none": the agent's user
    task_isolation: Literal["users", "none"] = "users"
    use_bwrap: bool = False
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"


# Tasks one job may hold by default (see CoordinatorConfig.max_tasks_per_job).
MAX_TASKS_PER_JOB = 2_000_000
# Tasks all jobs together may hold by default (see CoordinatorConfig.max_tasks).
MAX_TASKS = 10_000_000
# Pools (not counting auto pools) and active jobs + job schedules by default: Azure Batch's
# largest account quotas.
MAX_POOLS = 500
MAX_ACTIVE_JOBS = 1000


class CoordinatorConfig(_Config):
    host: str = "127.0.0.1"
    # 0 asks the OS for a free port (tests); otherwise 1..65535
    port: int = 7070
    state_dir: str = "./tvm-state"
    # empty: STATE_DIR/coordinator.db (SQLite); a postgresql:// URL: a PostgreSQL database that
    # several coordinators may share, one active (holding a lease of lease-ttl seconds) and the
    # others standing by
    store: str = ""
    lease_ttl: float = 10.0
    account: str = "tvm"
    heartbeat_timeout: float = 30.0
    # TVM healing: a closed agent link not back within link-grace seconds loses its TVM (`unknown`,
    # tasks requeued); an `unknown` TVM leaves its pool after unknown-tvm-timeout seconds (a pool's
    # unknownTvmTimeout overrides it) and is replaced; unusable-after-failures tasks in a row that
    # fail on one TVM and succeed elsewhere make it `unusable`.
    link_grace: float = 5.0
    unknown_tvm_timeout: float = 120.0
    unusable_after_failures: int = 3
    max_pool_size: int = 1000
    # tasks one job may hold (all states): a job manager's credential cannot grow the coordinator's
    # memory without bound (~0.5 KiB per task)
    max_tasks_per_job: int = MAX_TASKS_PER_JOB
    # tasks all jobs together may hold (all states): many jobs cannot do what one may not
    max_tasks: int = MAX_TASKS
    # the account's quotas (Azure Batch's PoolQuotaReached, ActiveJobAndScheduleQuotaReached):
    # pools made by a create call, and workitems (jobs and job schedules) not yet completed
    max_pools: int = MAX_POOLS
    max_active_jobs: int = MAX_ACTIVE_JOBS
    tls_cert: str = ""
    tls_key: str = ""
    join_token: str = ""
    join_token_file: str = ""
    # intra-pool ports (issue 8): "LOW-HIGH", at least 1100 and outside the kernel's ephemeral range
    port_range: str = "1100-32767"
    ports_per_tvm: int = 50
    # largest `POST /files` upload in bytes (streamed to disk; larger: 413 RequestBodyTooLarge)
    max_upload_size: int = 4 * 1024 * 1024 * 1024
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    # the URL other machines reach this coordinator at (join command, agents started elsewhere)
    public_url: str = ""
    # named provisioners (ssh, slurm, kubernetes), checked by coordinator/runtime/provisioners
    provisioner: dict[str, Any] = {}


_C = TypeVar("_C", bound=_Config)

_URL_SCHEMES = ("ws", "wss", "http", "https")
# ids end up in file names and log lines: keep them boring
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AT_PATH_RE = re.compile(r" - at `\$[^`]*`$")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")


def validate_coordinator_url(url: str) -> str | None:
    """Return why ``url`` is not a usable coordinator URL (or comma-separated list of them: an
    active coordinator and its standbys), or None when it is."""
    if not url:
        return "must not be empty"
    if "," in url:
        for one in url.split(","):
            why = validate_coordinator_url(one.strip())
            if why:
                return why
        return None
    if any(c.isspace() for c in url):
        return f"must not contain whitespace: {url!r}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc}): {url!r}"
    if parts.scheme not in _URL_SCHEMES:
        return f"must start with ws://, wss://, http:// or https://, got {url!r}"
    if not parts.hostname:
        return f"has no host: {url!r}"
    return None


def load_agent_config(
    path: str | None,
    overrides: Mapping[str, object],
    *,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Load the agent config; ``environ`` defaults to ``os.environ`` (injectable for tests)."""
    cfg, sources = _load(AgentConfig, path, overrides, AGENT_ENV_PREFIX, environ)
    _check_agent(cfg, sources)
    return cfg


def load_coordinator_config(
    path: str | None,
    overrides: Mapping[str, object],
    *,
    environ: Mapping[str, str] | None = None,
) -> CoordinatorConfig:
    """Load the coordinator config; ``environ`` defaults to ``os.environ``."""
    cfg, sources = _load(CoordinatorConfig, path, overrides, COORDINATOR_ENV_PREFIX, environ)
    _check_coordinator(cfg, sources)
    return cfg


def _load(
    cls: type[_C],
    path: str | None,
    overrides: Mapping[str, object],
    env_prefix: str,
    environ: Mapping[str, str] | None,
) -> tuple[_C, dict[str, str]]:
    """Merge the layers; also return where each (kebab) key's value came from."""
    fields = {f.name: f.encode_name for f in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = dict.fromkeys(fields, "default")

    if path is not None:
        cfg, present = _decode_file(cls, path)
        for name, key in fields.items():
            if key in present:
                values[name] = getattr(cfg, name)
                sources[name] = path

    env = os.environ if environ is None else environ
    for name, key in fields.items():
        var = env_prefix + name.upper()
        if var in env:
            values[name] = _convert_one(cls, key, env[var], f"environment variable {var}")
            sources[name] = f"environment variable {var}"

    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping, got {type(overrides).__name__}")
    for name, value in overrides.items():
        if value is None:
            continue
        option = "--" + str(name).replace("_", "-")
        if name not in fields:
            raise ConfigError(
                f"unknown option {option} for {cls.__name__}"
                f"{_hint(str(name), list(fields.values()))}",
                source=option,
            )
        values[name] = _convert_one(cls, fields[name], value, f"option {option}")
        sources[name] = f"option {option}"

    return cls(**values), {fields[n]: s for n, s in sources.items()}


def _decode_file(cls: type[_C], path: str) -> tuple[_C, set[str]]:
    """Decode and type-check the file; also return the keys it sets."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}", source=path) from exc
    try:
        cfg = msgspec.toml.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _UNKNOWN_RE.match(msg)
        if m:
            key = m["key"]
            valid = [f.encode_name for f in msgspec.structs.fields(cls)]
            raise ConfigError(
                f"{path}: unknown key `{key}`{_hint(key, valid)}", source=path, key=key
            ) from None
        key_m = re.search(r"at `\$\.([^`.\[]*)", msg)
        raise ConfigError(f"{path}: {msg}", source=path, key=key_m[1] if key_m else "") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid TOML: not UTF-8 text (byte {exc.start})", source=path
        ) from None
    except msgspec.DecodeError as exc:
        # tomllib's message carries "(at line N, column M)"
        raise ConfigError(f"{path}: invalid TOML: {exc}", source=path) from None
    # decoded fine above, so this cannot fail; it tells file-set keys from defaults
    return cfg, set(msgspec.toml.decode(data))


def _convert_one(cls: type[_C], key: str, value: object, source: str) -> Any:
    """Type-check one value for field ``key``; strings are parsed (env vars are strings)."""
    try:
        cfg = msgspec.convert({key: value}, cls, strict=False)
    except msgspec.ValidationError as exc:
        msg = _AT_PATH_RE.sub("", str(exc))
        if isinstance(value, str):
            msg = msg.replace("got `str`", f"got {value!r}")
        raise ConfigError(f"{source}: {msg}", source=source, key=key) from None
    return getattr(cfg, key.replace("-", "_"))


def _hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), valid, n=1)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f" (valid keys: {', '.join(valid)})"


def _fail(sources: Mapping[str, str], key: str, problem: str) -> ConfigError:
    src = sources.get(key, "default")
    return ConfigError(f"{src}: `{key}` {problem}", source=src, key=key)


def _positive(sources: Mapping[str, str], key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise _fail(sources, key, f"must be a positive number of seconds, got {value}")


def _port(sources: Mapping[str, str], key: str, value: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise _fail(sources, key, f"must be a port number in {low}..65535, got {value}")


def _check_agent(cfg: AgentConfig, src: Mapping[str, str]) -> None:
    if cfg.coordinator:
        why = validate_coordinator_url(cfg.coordinator)
        if why:
            raise _fail(src, "coordinator", why)
    if not cfg.root:
        raise _fail(src, "root", "must not be empty")
    if cfg.name and not _NAME_RE.match(cfg.name):
        raise _fail(src, "name", f"must be 1-64 letters, digits, '.', '_' or '-', got {cfg.name!r}")
    _positive(src, "heartbeat-interval", cfg.heartbeat_interval)
    _positive(src, "reconnect-max-backoff", cfg.reconnect_max_backoff)
    _positive(src, "retention-sweep-interval", cfg.retention_sweep_interval)
    if not math.isfinite(cfg.drain_grace) or cfg.drain_grace < 0:
        raise _fail(src, "drain-grace", f"must be 0 or more seconds, got {cfg.drain_grace}")
    _port(src, "port-range-low", cfg.port_range_low)
    _port(src, "port-range-high", cfg.port_range_high)
    if cfg.port_range_low > cfg.port_range_high:
        raise _fail(
            src,
            "port-range-low",
            f"({cfg.port_range_low}) must not be above port-range-high ({cfg.port_range_high})",
        )
    if cfg.task_user and not re.match(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$", cfg.task_user):
        raise _fail(src, "task-user", f"is not a valid user name: {cfg.task_user!r}")


def _check_coordinator(cfg: CoordinatorConfig, src: Mapping[str, str]) -> None:
    if not cfg.host:
        raise _fail(src, "host", "must not be empty")
    _port(src, "port", cfg.port, allow_zero=True)
    if not cfg.state_dir:
        raise _fail(src, "state-dir", "must not be empty")
    if cfg.store and not cfg.store.startswith(("postgresql://", "postgres://")):
        raise _fail(
            src,
            "store",
            "must be a postgresql://USER@HOST/DB URL (or empty for STATE_DIR/coordinator.db), "
            f"got {cfg.store.split('://')[0]!r}",
        )
    _positive(src, "lease-ttl", cfg.lease_ttl)
    if cfg.lease_ttl < 2:
        raise _fail(src, "lease-ttl", f"must be at least 2 seconds, got {cfg.lease_ttl}")
    if not _NAME_RE.match(cfg.account):
        raise _fail(
            src, "account", f"must be 1-64 letters, digits, '.', '_' or '-', got {cfg.account!r}"
        )
    _positive(src, "heartbeat-timeout", cfg.heartbeat_timeout)
    _positive(src, "link-grace", cfg.link_grace)
    _positive(src, "unknown-tvm-timeout", cfg.unknown_tvm_timeout)
    if cfg.unusable_after_failures < 1:
        raise _fail(
            src,
            "unusable-after-failures",
            f"must be at least 1, got {cfg.unusable_after_failures}",
        )
    if cfg.max_pool_size < 1:
        raise _fail(src, "max-pool-size", f"must be at least 1, got {cfg.max_pool_size}")
    if cfg.max_tasks_per_job < 1:
        raise _fail(src, "max-tasks-per-job", f"must be at least 1, got {cfg.max_tasks_per_job}")
    if cfg.max_tasks < 1:
        raise _fail(src, "max-tasks", f"must be at least 1, got {cfg.max_tasks}")
    if cfg.max_pools < 1:
        raise _fail(src, "max-pools", f"must be at least 1, got {cfg.max_pools}")
    if cfg.max_active_jobs < 1:
        raise _fail(src, "max-active-jobs", f"must be at least 1, got {cfg.max_active_jobs}")
    if cfg.max_upload_size < 0:
        raise _fail(src, "max-upload-size", f"must be 0 or more bytes, got {cfg.max_upload_size}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        missing = "tls-key" if cfg.tls_cert else "tls-cert"
        raise _fail(src, missing, "must be set together with tls-cert/tls-key (both or neither)")
    if cfg.public_url:
        why = validate_coordinator_url(cfg.public_url)
        if why:
            raise _fail(src, "public-url", why)
    try:
        parse_port_range(cfg.port_range, cfg.ports_per_tvm)
    except ValueError as exc:
        raise _fail(src, "port-range", str(exc)) from None


def parse_port_range(text: str, per_tvm: int) -> tuple[int, int, int]:
    """ "LOW-HIGH" and ports per TVM -> (low, high, per_tvm); ValueError says what is wrong
    (below 1100, overlapping this host's ephemeral range, ...)."""
    from .ports import PortRangeConfig

    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"must be LOW-HIGH like 1100-32767, got {text!r}")
    cfg = PortRangeConfig(int(low), int(high), per_tvm)
    return cfg.low, cfg.high, cfg.per_tvm
