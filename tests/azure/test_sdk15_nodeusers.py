"""Node users with Microsoft's `azure-batch` 15.1.0, unmodified, against a real `tvm up` whose two
agents share this host: each user is a real Linux account (password hash in /etc/shadow,
authorized_keys), replaced and deleted for real; names taken on the host (by a person or by the
other TVM) are refused, not adopted; a TVM's users go with it."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from tests.azure import sdk15
from tests.azure.sdk15 import idle_nodes, ubuntu_pool, uid, wait

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates Linux users)")

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJbzYvN0c5dE1vZ0hB1n0Z2lF2a0b5eWl1v8jF2Kx3aQ one@test"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq0N3lq0N3lq0N3lq0N3lq0N3lq0N3lq0N3lq0N3lq0 two@test"


up = sdk15.up_fixture(2)
client = sdk15.client_fixture()


@pytest.fixture
def names() -> Iterator[Callable[[], str]]:
    """Unique user names; any a test leaves on the host is removed at the end."""
    made: list[str] = []

    def new() -> str:
        made.append(f"nu{os.getpid()}{uuid.uuid4().hex[:6]}")
        return made[-1]

    yield new
    for name in made:
        if _account(name) is not None:
            subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


def _account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _shadow(name: str) -> list[str]:
    with open("/etc/shadow") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if fields[0] == name:
                return fields
    raise AssertionError(f"{name} is not in /etc/shadow")


def _hash_matches(name: str, password: str) -> bool:
    """The account's hash checked by openssl's own SHA-512 crypt (not ours), else libc's."""
    stored = _shadow(name)[1]
    assert stored.startswith("$6$"), stored
    salt = stored.split("$")[2]
    if shutil.which("openssl") is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # the standard module until 3.13: libc's crypt(3)

        return crypt.crypt(password, stored) == stored
    out = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out == stored


def _keys(name: str) -> str | None:
    path = Path(pwd.getpwnam(name).pw_dir) / ".ssh" / "authorized_keys"
    return path.read_text() if path.exists() else None


def _pool(client: BatchClient, nodes: int) -> tuple[str, list[str]]:
    pool_id = uid("nu-pool")
    client.create_pool(ubuntu_pool(pool_id, nodes))
    got = idle_nodes(client, pool_id, nodes, f"{nodes} idle nodes")
    return pool_id, sorted(str(n.id) for n in got)


def _code(exc: pytest.ExceptionInfo[HttpResponseError]) -> tuple[int | None, str | None]:
    return exc.value.status_code, exc.value.error.code if exc.value.error else None


def test_add_replace_delete_node_user(client: BatchClient, names: Callable[[], str]) -> None:
    pool_id, nodes = _pool(client, 1)
    node = nodes[0]
    pw_user, key_user = names(), names()
    try:
        # As the SDK's own tests do: a password only.
        client.create_node_user(
            pool_id,
            node,
            bm.BatchNodeUserCreateOptions(name=pw_user, password="kj4#Pw-" + pw_user),
        )
        acct = _account(pw_user)
        assert acct is not None
        assert acct.pw_shell == "/bin/bash"
        assert _hash_matches(pw_user, "kj4#Pw-" + pw_user)
        assert _keys(pw_user) is None
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
        client.create_node_user(
            pool_id,
            node,
            bm.BatchNodeUserCreateOptions(
                name=key_user, ssh_public_key=KEY1, expiry_time=expiry, is_admin=False
            ),
        )
        assert _keys(key_user) == KEY1 + "\n"
        keys_path = Path(pwd.getpwnam(key_user).pw_dir) / ".ssh" / "authorized_keys"
        st = keys_path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam(key_user).pw_uid, 0o600)
        assert _shadow(key_user)[1] in ("!", "!*", "*")  # no password: key login only
        # The account expires at the end of the expiry's day (days since the epoch in shadow).
        day = int(_shadow(key_user)[7])
        assert day == (expiry + dt.timedelta(seconds=86399)).date().toordinal() - 719163
        with pytest.raises(ResourceExistsError) as exists:
            client.create_node_user(
                pool_id, node, bm.BatchNodeUserCreateOptions(name=key_user, password="x1")
            )
        assert _code(exists) == (409, "NodeUserExists")

        # Replace: the new password and key; what is left out is removed.
        client.replace_node_user(
            pool_id,
            node,
            key_user,
            bm.BatchNodeUserReplaceOptions(password="n3w-Pass", ssh_public_key=KEY2),
        )
        assert _hash_matches(key_user, "n3w-Pass")
        assert _keys(key_user) == KEY2 + "\n"
        client.replace_node_user(
            pool_id, node, pw_user, bm.BatchNodeUserReplaceOptions(ssh_public_key=KEY1)
        )
        assert _shadow(pw_user)[1] == "!"
        assert _keys(pw_user) == KEY1 + "\n"

        home = pwd.getpwnam(pw_user).pw_dir
        for name in (pw_user, key_user):
            client.delete_node_user(pool_id, node, name)
            assert _account(name) is None
        assert not os.path.exists(home)
        with pytest.raises(ResourceNotFoundError) as gone:
            client.delete_node_user(pool_id, node, pw_user)
        assert _code(gone) == (404, "NodeUserNotFound")
        # An account removed behind the service's back: the delete still clears the user.
        by_hand = names()
        client.create_node_user(
            pool_id, node, bm.BatchNodeUserCreateOptions(name=by_hand, password="pw-h")
        )
        subprocess.run(["userdel", "--remove", by_hand], check=True, capture_output=True)
        client.delete_node_user(pool_id, node, by_hand)
        with pytest.raises(ResourceNotFoundError):
            client.delete_node_user(pool_id, node, by_hand)
        with pytest.raises(ResourceNotFoundError) as gone:
            client.replace_node_user(
                pool_id, node, pw_user, bm.BatchNodeUserReplaceOptions(password="x1")
            )
        assert _code(gone) == (404, "NodeUserNotFound")
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def test_names_taken_on_the_host_are_refused(client: BatchClient, names: Callable[[], str]) -> None:
    pool_id, (node_a, node_b) = _pool(client, 2)
    host_user, shared = names(), names()
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", host_user],
        check=True,
    )
    before = pwd.getpwnam(host_user)
    shadow_before = _shadow(host_user)
    try:
        # An account the agent did not make: refused, and left exactly as it was.
        with pytest.raises(ResourceExistsError) as taken:
            client.create_node_user(
                pool_id, node_a, bm.BatchNodeUserCreateOptions(name=host_user, password="pw-1")
            )
        assert _code(taken) == (409, "NodeUserExists")
        assert "not created for this node" in str(taken.value.message)
        assert pwd.getpwnam(host_user) == before
        assert _shadow(host_user) == shadow_before
        with pytest.raises(ResourceNotFoundError) as nf:
            client.delete_node_user(pool_id, node_a, host_user)
        assert _code(nf) == (404, "NodeUserNotFound")
        with pytest.raises(ResourceNotFoundError):
            client.replace_node_user(
                pool_id, node_a, host_user, bm.BatchNodeUserReplaceOptions(password="pw-2")
            )
        assert _account(host_user) is not None
        assert _shadow(host_user) == shadow_before

        # The other TVM on this host has the name: refused on this one, untouched there.
        client.create_node_user(
            pool_id, node_a, bm.BatchNodeUserCreateOptions(name=shared, password="pw-a")
        )
        with pytest.raises(ResourceExistsError) as other:
            client.create_node_user(
                pool_id, node_b, bm.BatchNodeUserCreateOptions(name=shared, password="pw-b")
            )
        assert _code(other) == (409, "NodeUserExists")
        with pytest.raises(ResourceNotFoundError):
            client.delete_node_user(pool_id, node_b, shared)
        assert _hash_matches(shared, "pw-a")

        # isAdmin would be root on a shared host: refused, nothing made.
        admin = names()
        with pytest.raises(HttpResponseError) as adm:
            client.create_node_user(
                pool_id,
                node_a,
                bm.BatchNodeUserCreateOptions(name=admin, password="pw", is_admin=True),
            )
        assert _code(adm) == (400, "InvalidPropertyValue")
        assert "root" in str(adm.value.message)
        assert _account(admin) is None
        for bad in ("root", "Bad", "tvmslot0", "x" * 33):
            with pytest.raises(HttpResponseError) as refused:
                client.create_node_user(
                    pool_id, node_a, bm.BatchNodeUserCreateOptions(name=bad, password="pw")
                )
            assert _code(refused) == (400, "InvalidPropertyValue"), bad
        with pytest.raises(HttpResponseError) as badkey:
            client.create_node_user(
                pool_id,
                node_a,
                bm.BatchNodeUserCreateOptions(name=admin, ssh_public_key="not a key"),
            )
        assert _code(badkey) == (400, "InvalidPropertyValue")
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        with pytest.raises(HttpResponseError) as old:
            client.create_node_user(
                pool_id, node_a, bm.BatchNodeUserCreateOptions(name=admin, expiry_time=past)
            )
        assert _code(old) == (400, "InvalidPropertyValue")
        with pytest.raises(ResourceNotFoundError) as nn:
            client.create_node_user(
                pool_id, "no-such-node", bm.BatchNodeUserCreateOptions(name=admin, password="p")
            )
        assert _code(nn) == (404, "NodeNotFound")
        assert _account(admin) is None
        client.delete_node_user(pool_id, node_a, shared)
        assert _account(shared) is None
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()
        subprocess.run(["userdel", host_user], check=False)


def test_users_go_with_their_tvm(client: BatchClient, names: Callable[[], str]) -> None:
    pool_id, (node,) = _pool(client, 1)
    user = names()
    try:
        client.create_node_user(
            pool_id, node, bm.BatchNodeUserCreateOptions(name=user, ssh_public_key=KEY1)
        )
        assert _account(user) is not None
        client.begin_remove_nodes(
            pool_id, bm.BatchNodeRemoveOptions(node_ids=[node]), polling_interval=1
        ).result()
        wait(lambda: _account(user) is None, "the node user removed with its TVM")
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()
