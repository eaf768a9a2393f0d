"""System test (root): remote-login users on a TVM. The agent creates a real Linux user with
~/.ssh/authorized_keys and an account expiry, and deletes it again; bad input is refused."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import stat

import pytest

from coordinator.client import BatchError
from tests.harness import cluster_ctx
from tests.system.agent_work import user as _user
from tvmagent.nodeusers import LEDGER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates Linux users)")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJbzYvN0c5dE1vZ0hB1n0Z2lF2a0b5eWl1v8jF2Kx3aQ tester@example"


async def test_add_list_delete_remote_login_user(nursery, tmp_path):
    name = f"rl{secrets.token_hex(3)}"
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3) as c:
        await c.pool_with_tvms("p", 1)
        tvm = (await c.client.tvms.list("p"))[0]
        settings = await c.client.tvm_users.remote_login_settings("p", tvm.name)
        assert settings.remote_login_port == 22
        assert settings.remote_login_ip_address == tvm.ip_address
        expiry = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
        try:
            added = await c.client.tvm_users.add("p", tvm.name, name, KEY, expiry_time=expiry)
            assert added.name == name
            await c.wait_for(lambda: _user(name) is not None, what="the Linux user")
            pw = _user(name)
            keys = os.path.join(pw.pw_dir, ".ssh", "authorized_keys")
            await c.wait_for(lambda: os.path.exists(keys), what="authorized_keys")
            with open(keys) as f:  # noqa: ASYNC230 - small local file
                assert f.read() == KEY + "\n"
            st = os.stat(keys)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0o600)
            # The agent records what it made (its ledger) and tags the account with it.
            ledgers = list(tmp_path.rglob(LEDGER))
            entries = [json.loads(p.read_text()) for p in ledgers]  # noqa: ASYNC240 - small local files
            mine = [e[name] for e in entries if name in e]
            assert len(mine) == 1
            assert mine[0]["uid"] == pw.pw_uid
            assert pw.pw_gecos == f"tvm node user {mine[0]['tag']}"
            assert [u.name for u in await c.client.tvm_users.list("p", tvm.name)] == [name]
            with pytest.raises(BatchError) as ei:
                await c.client.tvm_users.add("p", tvm.name, name, KEY)
            assert (ei.value.status, ei.value.code) == (409, "UserExists")
            await c.client.tvm_users.delete("p", tvm.name, name)
            await c.wait_for(lambda: _user(name) is None, what="the Linux user removed")
            assert await c.client.tvm_users.list("p", tvm.name) == []
            with pytest.raises(BatchError) as ei:
                await c.client.tvm_users.delete("p", tvm.name, name)
            assert (ei.value.status, ei.value.code) == (404, "UserNotFound")
        finally:
            if _user(name) is not None:
                os.system(f"userdel -r {name} >/dev/null 2>&1")  # noqa: S605, ASYNC221 - cleanup of our own user


BAD = [
    ("name", {"name": "Root"}, "InvalidUserName"),
    ("name", {"name": "1abc"}, "InvalidUserName"),
    ("name", {"name": "a" * 33}, "InvalidUserName"),
    ("name", {"name": "bad name"}, "InvalidUserName"),
    ("name", {"name": "root"}, "InvalidUserName"),
    ("name", {"name": "tvmslot0"}, "InvalidUserName"),
    ("sshPublicKey", {"ssh_public_key": "not a key"}, "InvalidSshPublicKey"),
    (
        "sshPublicKey",
        {"ssh_public_key": KEY + "\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB x"},
        "InvalidSshPublicKey",
    ),
    ("expiryTime", {"expiry_time": "2001-01-01T00:00:00Z"}, "InvalidPropertyValue"),
    ("expiryTime", {"expiry_time": "tomorrow"}, "InvalidPropertyValue"),
    ("expiryTime", {"expiry_time": "2999-01-01T00:00:00Z"}, "InvalidPropertyValue"),
]


async def test_bad_remote_login_users_are_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3) as c:
        await c.pool_with_tvms("p", 1)
        tvm = (await c.client.tvms.list("p"))[0]
        for field, kwargs, code in BAD:
            args = {"name": "okname", "ssh_public_key": KEY, **kwargs}
            with pytest.raises(BatchError) as ei:
                await c.client.tvm_users.add(
                    "p", tvm.name, args.pop("name"), args.pop("ssh_public_key"), **args
                )
            assert (ei.value.status, ei.value.code) == (400, code), kwargs
            assert ei.value.values.get("field") == field, kwargs
        assert await c.client.tvm_users.list("p", tvm.name) == []
        with pytest.raises(BatchError) as ei:
            await c.client.tvm_users.add("p", "no-such-tvm", "okname", KEY)
        assert ei.value.status == 404
