"""The coordinator's TVM healing settings: read from its TOML file, and every bad value refused with
the file and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.config import ConfigError, load_coordinator_config


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return str(path)


def test_defaults_and_file_values(tmp_path: Path) -> None:
    cfg = load_coordinator_config(None, {}, environ={})
    assert (cfg.link_grace, cfg.unknown_tvm_timeout, cfg.unusable_after_failures) == (5.0, 120.0, 3)
    path = _write(
        tmp_path, "link-grace = 2.5\nunknown-tvm-timeout = 30\nunusable-after-failures = 5\n"
    )
    cfg = load_coordinator_config(path, {}, environ={})
    assert (cfg.link_grace, cfg.unknown_tvm_timeout, cfg.unusable_after_failures) == (2.5, 30.0, 5)


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ("link-grace = 0", "link-grace", "positive number of seconds"),
        ("link-grace = -1", "link-grace", "positive number of seconds"),
        ("unknown-tvm-timeout = 0", "unknown-tvm-timeout", "positive number of seconds"),
        ('unknown-tvm-timeout = "2m"', "unknown-tvm-timeout", "Expected `float`"),
        ("unusable-after-failures = 0", "unusable-after-failures", "at least 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, line: str, key: str, says: str) -> None:
    path = _write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        load_coordinator_config(path, {}, environ={})
    assert info.value.key == key
    assert says in str(info.value)
