"""Config precedence (defaults < file < env < flags) and an error for every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.config import (
    AgentConfig,
    ConfigError,
    CoordinatorConfig,
    load_agent_config,
    load_coordinator_config,
    validate_coordinator_url,
)


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_file_env_or_flags() -> None:
    assert load_agent_config(None, {}, environ={}) == AgentConfig()
    assert load_coordinator_config(None, {}, environ={}) == CoordinatorConfig()
    cfg = AgentConfig()
    assert (cfg.root, cfg.heartbeat_interval, cfg.port_range_low, cfg.port_range_high) == (
        "/var/lib/tvm-agent",
        5.0,
        20000,
        29999,
    )
    assert (cfg.log_level, cfg.log_format, cfg.use_bwrap) == ("info", "json", False)
    coord = CoordinatorConfig()
    assert (coord.host, coord.port, coord.state_dir, coord.account) == (
        "127.0.0.1",
        7070,
        "./tvm-state",
        "tvm",
    )


def test_full_agent_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
coordinator = "wss://coord:7070/agent"
token = "s3cret"
root = "/srv/tvm"
name = "tvm-001"
heartbeat-interval = 2
reconnect-max-backoff = 10.5
ca-file = "/etc/tvm/ca.pem"
port-range-low = 30000
port-range-high = 30100
drain-grace = 0
task-user = "tvmtask"
use-bwrap = true
log-level = "debug"
log-format = "console"
""",
    )
    assert load_agent_config(path, {}, environ={}) == AgentConfig(
        coordinator="wss://coord:7070/agent",
        token="s3cret",
        root="/srv/tvm",
        name="tvm-001",
        heartbeat_interval=2.0,
        reconnect_max_backoff=10.5,
        ca_file="/etc/tvm/ca.pem",
        port_range_low=30000,
        port_range_high=30100,
        drain_grace=0.0,
        task_user="tvmtask",
        use_bwrap=True,
        log_level="debug",
        log_format="console",
    )


def test_full_coordinator_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
host = "0.0.0.0"
port = 8443
state-dir = "/var/lib/tvm-coordinator"
account = "acme"
heartbeat-timeout = 12.5
max-pool-size = 50
tls-cert = "/etc/tvm/cert.pem"
tls-key = "/etc/tvm/key.pem"
join-token = "jt"
log-level = "warning"
log-format = "console"
""",
        "coordinator.toml",
    )
    cfg = load_coordinator_config(path, {}, environ={})
    assert cfg == CoordinatorConfig(
        host="0.0.0.0",
        port=8443,
        state_dir="/var/lib/tvm-coordinator",
        account="acme",
        heartbeat_timeout=12.5,
        max_pool_size=50,
        tls_cert="/etc/tvm/cert.pem",
        tls_key="/etc/tvm/key.pem",
        join_token="jt",
        log_level="warning",
        log_format="console",
    )


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'token = "from-file"\nheartbeat-interval = 7\nroot = "/file/root"\nname = "file"\n',
    )
    env = {
        "TVM_AGENT_HEARTBEAT_INTERVAL": "8.5",
        "TVM_AGENT_ROOT": "/env/root",
        "TVM_AGENT_USE_BWRAP": "true",
        "TVM_AGENT_PORT_RANGE_HIGH": "29000",
        "TVM_COORDINATOR_PORT": "1",  # other component's prefix: ignored
    }
    overrides = {"root": "/flag/root", "name": None, "log_format": "console"}
    cfg = load_agent_config(path, overrides, environ=env)
    assert cfg.token == "from-file"  # file only
    assert cfg.heartbeat_interval == 8.5  # env beats file
    assert cfg.root == "/flag/root"  # flag beats env and file
    assert cfg.name == "file"  # None flag ignored
    assert cfg.use_bwrap is True
    assert cfg.port_range_high == 29000
    assert cfg.log_format == "console"
    assert cfg.reconnect_max_backoff == 30.0  # default survives


def test_reads_real_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVM_COORDINATOR_PORT", "9090")
    monkeypatch.setenv("TVM_COORDINATOR_JOIN_TOKEN", "abc")
    cfg = load_coordinator_config(None, {})
    assert (cfg.port, cfg.join_token) == (9090, "abc")


def test_coordinator_port_zero_means_any_free_port() -> None:
    assert load_coordinator_config(None, {"port": 0}, environ={}).port == 0


# --- file errors ---------------------------------------------------------------------------


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, 'heartbeat-interval = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(path, {}, environ={})
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert "Expected `float`, got `str`" in msg
    assert "heartbeat-interval" in msg
    assert (info.value.source, info.value.key) == (path, "heartbeat-interval")


def test_unknown_key_with_hint(tmp_path: Path) -> None:
    path = _write(tmp_path, "port-range-lo = 3\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: unknown key `port-range-lo`") as info:
        load_agent_config(path, {}, environ={})
    assert "did you mean `port-range-low`" in str(info.value)
    assert info.value.key == "port-range-lo"


def test_snake_case_key_is_unknown_with_kebab_hint(tmp_path: Path) -> None:
    path = _write(tmp_path, "heartbeat_interval = 3\n")
    with pytest.raises(ConfigError, match="did you mean `heartbeat-interval`"):
        load_agent_config(path, {}, environ={})


def test_unknown_key_far_from_any_lists_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "zzz = 3\n", "coordinator.toml")
    with pytest.raises(ConfigError, match=r"unknown key `zzz` \(valid keys: host, port,"):
        load_coordinator_config(path, {}, environ={})


def test_table_is_unknown_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[agent]\ntoken = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key `agent`"):
        load_agent_config(path, {}, environ={})


def test_broken_toml_gives_line_number(tmp_path: Path) -> None:
    path = _write(tmp_path, 'token = "ok"\nroot = \n')
    with pytest.raises(ConfigError, match=r"agent\.toml: invalid TOML: .*line 2"):
        load_agent_config(path, {}, environ={})


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read config file: No such file"):
        load_agent_config(path, {}, environ={})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file: Is a directory"):
        load_coordinator_config(str(tmp_path), {}, environ={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'token = "x"\n')
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="cannot read config file: Permission denied"):
        load_agent_config(path, {}, environ={})


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'token = "\xff"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: invalid TOML"):
        load_agent_config(str(path), {}, environ={})


def test_bad_enum_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'log-format = "xml"\n')
    with pytest.raises(ConfigError, match=r"Invalid enum value 'xml' - at `\$\.log-format`"):
        load_agent_config(path, {}, environ={})


# --- env and flag errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "match"),
    [
        ("TVM_AGENT_HEARTBEAT_INTERVAL", "fast", "Expected `float`, got 'fast'"),
        ("TVM_AGENT_PORT_RANGE_LOW", "2.5", "Expected `int`, got '2.5'"),
        ("TVM_AGENT_PORT_RANGE_LOW", "", "Expected `int`, got ''"),
        ("TVM_AGENT_USE_BWRAP", "maybe", "Expected `bool`, got 'maybe'"),
        ("TVM_AGENT_LOG_LEVEL", "loud", "Invalid enum value 'loud'"),
    ],
)
def test_bad_env_value_names_variable(var: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^environment variable {var}: {match}") as info:
        load_agent_config(None, {}, environ={var: value})
    assert info.value.source == f"environment variable {var}"


def test_unknown_override_key() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown option --zzz-key for AgentConfig \(valid keys: coordinator,"
    ):
        load_agent_config(None, {"zzz_key": 4}, environ={})
    with pytest.raises(ConfigError, match="did you mean `heartbeat-timeout`"):
        load_coordinator_config(None, {"heartbeat_timout": 4.0}, environ={})


def test_override_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"^option --port: Expected `int`, got 'http'"):
        load_coordinator_config(None, {"port": "http"}, environ={})
    with pytest.raises(ConfigError, match=r"^option --max-pool-size: Expected `int`, got `array`"):
        load_coordinator_config(None, {"max_pool_size": [1]}, environ={})


def test_overrides_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="overrides must be a mapping"):
        load_agent_config(None, [("root", "/x")], environ={})  # type: ignore[arg-type]


# --- range checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"heartbeat_interval": 0}, "`heartbeat-interval` must be a positive number"),
        ({"heartbeat_interval": -1.5}, "`heartbeat-interval` must be a positive number"),
        ({"heartbeat_interval": float("nan")}, "`heartbeat-interval` must be a positive number"),
        ({"reconnect_max_backoff": float("inf")}, "`reconnect-max-backoff` must be a positive"),
        ({"drain_grace": -1}, "`drain-grace` must be 0 or more seconds"),
        ({"port_range_low": 0}, r"`port-range-low` must be a port number in 1\.\.65535, got 0"),
        ({"port_range_high": 70000}, "`port-range-high` must be a port number in 1..65535"),
        (
            {"port_range_low": 3000, "port_range_high": 2000},
            r"`port-range-low` \(3000\) must not be above port-range-high \(2000\)",
        ),
        ({"coordinator": "tcp://c:1"}, "`coordinator` must start with ws://"),
        ({"coordinator": "ws://"}, "`coordinator` has no host"),
        ({"coordinator": "ws://c:http"}, "`coordinator` is not a valid URL"),
        ({"coordinator": "ws://c d"}, "`coordinator` must not contain whitespace"),
        ({"root": ""}, "`root` must not be empty"),
        ({"name": "no/slashes"}, "`name` must be 1-64 letters"),
        ({"name": "x" * 65}, "`name` must be 1-64 letters"),
        ({"task_user": "bad user"}, "`task-user` is not a valid user name"),
    ],
)
def test_agent_range_errors_name_the_option(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_agent_config(None, overrides, environ={})
    assert str(info.value).startswith("option --")


def test_range_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "port-range-low = 70000\n")
    with pytest.raises(ConfigError, match=rf"^{path}: `port-range-low` must be a port number"):
        load_agent_config(path, {}, environ={})


def test_range_error_names_the_env_var() -> None:
    env = {"TVM_COORDINATOR_HEARTBEAT_TIMEOUT": "-3"}
    with pytest.raises(
        ConfigError, match=r"^environment variable TVM_COORDINATOR_HEARTBEAT_TIMEOUT: "
    ):
        load_coordinator_config(None, {}, environ=env)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"port": 65536}, r"`port` must be a port number in 0\.\.65535"),
        ({"port": -1}, "`port` must be a port number"),
        ({"host": ""}, "`host` must not be empty"),
        ({"state_dir": ""}, "`state-dir` must not be empty"),
        ({"account": "a b"}, "`account` must be 1-64 letters"),
        ({"account": ""}, "`account` must be 1-64 letters"),
        ({"heartbeat_timeout": 0}, "`heartbeat-timeout` must be a positive number"),
        ({"max_pool_size": 0}, "`max-pool-size` must be at least 1"),
        ({"max_tasks_per_job": 0}, "`max-tasks-per-job` must be at least 1"),
        ({"max_tasks": 0}, "`max-tasks` must be at least 1"),
        ({"max_pools": 0}, "`max-pools` must be at least 1"),
        ({"max_active_jobs": -1}, "`max-active-jobs` must be at least 1"),
        ({"tls_cert": "/c.pem"}, "`tls-key` must be set together with tls-cert"),
        ({"tls_key": "/k.pem"}, "`tls-cert` must be set together"),
        ({"log_level": "verbose"}, "Invalid enum value 'verbose'"),
    ],
)
def test_coordinator_range_errors(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_coordinator_config(None, overrides, environ={})


@pytest.mark.parametrize(
    "url", ["ws://c:7070", "wss://c/agent", "http://10.0.0.1:7070", "https://[::1]:8443/base"]
)
def test_valid_coordinator_urls(url: str) -> None:
    assert validate_coordinator_url(url) is None
    assert load_agent_config(None, {"coordinator": url}, environ={}).coordinator == url
