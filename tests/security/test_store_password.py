"""The PostgreSQL store's password never reaches a command line, a message or a log: libpq takes it
in the URL's user part or as a `password=` query parameter, and both forms are refused on
`tvm store migrate --to` (as on `tvm coordinator --store`) and redacted wherever the URL is named."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from coordinator.runtime.pgstore import has_password, redact
from tests.harness import agent_env


def _tvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        env=agent_env(env),
        timeout=120,
    )


def _secret() -> str:
    return f"pw{uuid.uuid4().hex}"


def test_a_password_query_parameter_is_redacted_and_counts_as_a_password() -> None:
    pw = _secret()
    for url in (
        f"postgresql:///db?host=/run/pg&password={pw}&user=tvm",
        f"postgresql://tvm@db.example/x?sslmode=require&PASSWORD={pw}",
        f"postgresql://tvm:{pw}@db.example/x?password={pw}",
    ):
        assert has_password(url), url
        shown = redact(url)
        assert pw not in shown, shown
        assert "***" in shown
    plain = "postgresql:///db?host=/run/pg&user=tvm"
    assert not has_password(plain)
    assert redact(plain) == plain


def test_an_unreachable_store_named_by_a_password_parameter_does_not_show_it(
    tmp_path: Path,
) -> None:
    pw = _secret()
    url = f"postgresql:///x?host={tmp_path}/no-such-socket-dir&user=tvm&password={pw}"
    state = tmp_path / "state"
    done = _tvm("coordinator", "--state-dir", str(state), "--port", "0", env={"TVM_STORE": url})
    assert done.returncode == 3, done.stderr
    assert "cannot connect to postgresql://" in done.stderr
    assert pw not in done.stderr + done.stdout
    for root, _dirs, files in os.walk(state):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert pw.encode() not in f.read(), name


def test_store_migrate_refuses_a_password_on_its_command_line(tmp_path: Path) -> None:
    pw = _secret()
    for url in (
        f"postgresql://tvm:{pw}@127.0.0.1:1/x",
        f"postgresql:///x?host={tmp_path}&user=tvm&password={pw}",
    ):
        done = _tvm("store", "migrate", "--state-dir", str(tmp_path), "--to", url)
        assert done.returncode == 2, done.stderr
        assert "must not carry a password" in done.stderr
        assert pw not in done.stderr + done.stdout


def test_a_malformed_password_echoed_by_libpq_is_not_shown(tmp_path: Path) -> None:
    # libpq quotes a malformed percent-encoded token whole in its error: the password itself.
    pw = _secret()
    for url in (
        f"postgresql://tvm:{pw}%zz@127.0.0.1:1/x",
        f"postgresql:///x?host={tmp_path}/none&user=tvm&password=%zz{pw}",
    ):
        done = _tvm(
            "coordinator",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            "0",
            env={"TVM_STORE": url},
        )
        assert done.returncode == 3, done.stderr
        assert "cannot connect to postgresql://" in done.stderr
        assert "percent-encoded" in done.stderr  # libpq's reason is kept
        assert pw not in done.stderr + done.stdout
