"""System test (root): the agent's node-user ledger on its own, as two agents sharing one host would
use it: accounts are made with a tag and recorded, another agent's or a person's account is never
adopted, changed or deleted, a planted symlink in a home is not followed, a half-made account left by
a crash is finished or dropped at start, and everything an agent made goes with its TVM. Homes are
made under tmp_path, accounts have unique names and are removed at the end."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.common.passhash import sha512_crypt
from protocol import messages as pm
from tests.system.agent_work import user as _account
from tvmagent.nodeusers import NodeUserError, NodeUserLedger

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates Linux users)")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJbzYvN0c5dE1vZ0hB1n0Z2lF2a0b5eWl1v8jF2Kx3aQ a@test"


@pytest.fixture
def names() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def new() -> str:
        made.append(f"lg{os.getpid()}{uuid.uuid4().hex[:6]}")
        return made[-1]

    yield new
    for name in made:
        if _account(name) is not None:
            subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


def _ledger(tmp_path: Path, agent: str) -> NodeUserLedger:
    private = tmp_path / agent
    private.mkdir(mode=0o700, exist_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return NodeUserLedger(str(private), home_base=str(home))


def _req(name: str, op: str = "add", **kw: object) -> pm.NodeUserRequest:
    return pm.NodeUserRequest(req_id=1, op=op, name=name, expiry=time.time() + 3600, **kw)  # type: ignore[arg-type]


def _code(exc: pytest.ExceptionInfo[NodeUserError]) -> str:
    return exc.value.code


def test_two_agents_on_one_host(tmp_path: Path, names: Callable[[], str]) -> None:
    a, b = _ledger(tmp_path, "a"), _ledger(tmp_path, "b")
    name = names()
    a.add(_req(name, password_hash=sha512_crypt("pw"), ssh_public_key=KEY), "tvm-1")
    pw = pwd.getpwnam(name)
    assert pw.pw_gecos == f"tvm node user {a.entries[name]['tag']}"
    assert a.owned(name) is not None
    # Agent b did not make it: it refuses the name and never touches the account.
    with pytest.raises(NodeUserError) as e:
        b.add(_req(name, password_hash=sha512_crypt("other")))
    assert _code(e) == "NodeUserExists"
    for op in (lambda: b.update(_req(name, "update")), lambda: b.delete(name)):
        with pytest.raises(NodeUserError) as e:
            op()
        assert _code(e) == "NodeUserNotFound"
    assert pwd.getpwnam(name) == pw
    # What a made survives a restart (a fresh ledger over the same file); joining another TVM
    # then removes the old TVM's users, and the rest go with their TVM.
    older = names()
    a.add(_req(older, ssh_public_key=KEY), "tvm-0")
    again = _ledger(tmp_path, "a")
    again.recover()
    assert again.owned(name) is not None
    assert again.remove_all(keep_tvm="tvm-1") == [older]
    assert _account(older) is None
    assert again.owned(name) is not None
    assert again.remove_all() == [name]
    assert _account(name) is None
    assert again.entries == {}


def test_accounts_and_homes_it_did_not_make_are_refused(
    tmp_path: Path, names: Callable[[], str]
) -> None:
    ledger = _ledger(tmp_path, "a")
    person = names()
    subprocess.run(["useradd", "--system", "--no-create-home", person], check=True)
    before = pwd.getpwnam(person)
    with pytest.raises(NodeUserError) as e:
        ledger.add(_req(person))
    assert _code(e) == "NodeUserExists"
    assert pwd.getpwnam(person) == before
    assert ledger.entries == {}
    # A leftover home of that name (someone else's files) is refused too, and left alone.
    leftover = names()
    (tmp_path / "home" / leftover).mkdir()
    (tmp_path / "home" / leftover / "theirs").write_text("x")
    with pytest.raises(NodeUserError) as e:
        ledger.add(_req(leftover))
    assert _code(e) == "NodeUserExists"
    assert _account(leftover) is None
    assert (tmp_path / "home" / leftover / "theirs").read_text() == "x"
    # Bad input: refused before anything is made.
    for bad in (
        _req(names(), password_hash="plain-text"),
        _req(names(), password_hash="$6$salt$abc:0:0"),
        _req(names(), ssh_public_key="not a key"),
        _req(names(), is_admin=True),
        _req("Root"),
    ):
        with pytest.raises(NodeUserError) as e:
            ledger.add(bad)
        assert _code(e) == "InvalidPropertyValue", bad
        assert _account(bad.name) is None
    assert ledger.entries == {}


def test_a_planted_symlink_is_not_followed(tmp_path: Path, names: Callable[[], str]) -> None:
    ledger = _ledger(tmp_path, "a")
    name = names()
    ledger.add(_req(name, ssh_public_key=KEY))
    home = Path(pwd.getpwnam(name).pw_dir)
    target = tmp_path / "elsewhere"
    target.mkdir()
    # The user replaces ~/.ssh with a link to a directory it should not write into.
    for p in (home / ".ssh").iterdir():
        p.unlink()
    (home / ".ssh").rmdir()
    (home / ".ssh").symlink_to(target)
    with pytest.raises(NodeUserError) as e:
        ledger.update(_req(name, "update", ssh_public_key=KEY))
    assert _code(e) == "NodeUserUpdateFailed"
    assert list(target.iterdir()) == []
    ledger.delete(name)
    assert _account(name) is None


def test_a_crash_between_ledger_and_account_is_settled_at_start(
    tmp_path: Path, names: Callable[[], str]
) -> None:
    ledger = _ledger(tmp_path, "a")
    made, never = names(), names()
    # As if the agent died right after useradd (entry still pending) or right before it.
    ledger.entries[made] = {"state": "pending", "tag": "feedface", "expiry": time.time() + 60}
    ledger.entries[never] = {"state": "pending", "tag": "deadbeef", "expiry": time.time() + 60}
    ledger._save()
    subprocess.run(["useradd", "--comment", "tvm node user feedface", made], check=True)
    restarted = _ledger(tmp_path, "a")
    restarted.recover()
    assert restarted.owned(made) is not None
    assert never not in restarted.entries
    restarted.delete(made)
    assert _account(made) is None
