"""Azure node users: add (POST .../users), replace (PUT .../users/{name}), delete.

A node user is a Linux account the TVM's agent makes on its host (`tvmagent/nodeusers.py`): the
agent is the authority on what exists, so each call waits for its answer, and the TVM record keeps
the user (no password) only once the agent has made it. A name taken on the host by anything the
agent did not make is refused with `NodeUserExists`; `isAdmin` is refused unless the agent runs on a
host of its own (see the README). The password is hashed here (SHA-512 crypt) and only the hash
goes to the agent; the coordinator stores neither.
"""

from __future__ import annotations

from typing import Any

from coordinator.common.errors import ApiError
from coordinator.common.passhash import sha512_crypt
from coordinator.common.timeutil import parse_time
from coordinator.core.records import TvmUserRec
from coordinator.core.tvm_ops import (
    DEFAULT_USER_LIFETIME_S,
    MAX_TVM_USERS,
    MAX_USER_LIFETIME_S,
)
from coordinator.rest.dispatch import Dispatcher, Response
from protocol import messages as pm

from .body import Body, parse_json
from .conv import empty, invalid
from .router import AzureApi, base

N = r"/pools/(?P<pool>[^/]+)/nodes/(?P<node>[^/]+)/users"
# How long a user operation may take on the agent (useradd, userdel of a large home).
AGENT_WAIT_S = 60.0
_STATUS = {
    "NodeUserExists": 409,
    "NodeUserNotFound": 404,
    "InvalidPropertyValue": 400,
    "NodeUserNotSupported": 409,
}
MAX_PASSWORD = 256


class NodeUserApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("POST", N, self.add)
        r.route("PUT", N + "/(?P<user>[^/]+)", self.update)
        r.route("DELETE", N + "/(?P<user>[^/]+)", self.delete)

    def _fields(self, b: Body) -> tuple[str, str, float]:
        """(password hash, ssh key, expiry) of an add or replace body."""
        password = b.text("password")
        if password is not None and (len(password) > MAX_PASSWORD or "\0" in password):
            raise invalid("password", "", f"password must be 1-{MAX_PASSWORD} characters")
        key = (b.text("sshPublicKey") or "").strip()
        self.core.tvm_ops.check_node_user_key(key)
        now = self.core.store.clock()
        text = b.text("expiryTime")
        expiry = parse_time(text, "expiryTime") if text else now + DEFAULT_USER_LIFETIME_S
        if expiry <= now:
            raise invalid("expiryTime", text, "expiryTime must be in the future")
        if expiry - now > MAX_USER_LIFETIME_S:
            raise invalid("expiryTime", text, "expiryTime may be at most 30 days ahead")
        return (sha512_crypt(password) if password else ""), key, expiry

    async def _agent(self, pool: str, node: str, make: Any) -> None:
        tvm = self.core.get_tvm(pool, node)
        resp = await self.svc.ask_agent(tvm.rec.agent_id, make, AGENT_WAIT_S)
        if resp is None:
            raise ApiError(
                409, "TVMUnreachable", f"node {node!r} is not connected: its users cannot change"
            )
        if resp.error_code:
            status = _STATUS.get(resp.error_code, 500)
            code = resp.error_code if status != 500 else "InternalError"
            raise ApiError(status, code, resp.message)

    async def _put(self, pool: str, node: str, op: str, user: TvmUserRec, pw_hash: str) -> None:
        """Add or replace the account on the agent's host; only once it is made there is the
        user recorded on the TVM."""
        await self._agent(
            pool,
            node,
            lambda rid: pm.NodeUserRequest(
                req_id=rid,
                op=op,
                name=user.name,
                password_hash=pw_hash,
                ssh_public_key=user.ssh_public_key,
                expiry=user.expiry,
                is_admin=user.is_admin,
            ),
        )
        await self.svc.execute(self.core.record_node_user, pool, node, user)

    async def add(
        self, pool: str, node: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        b = parse_json(body)
        name = b.req_text("name")
        self.core.tvm_ops.check_node_user_name(name)
        is_admin = b.flag("isAdmin")
        pw_hash, key, expiry = self._fields(b)
        b.log_unknown("node user")
        tvm = self.core.get_tvm(pool, node)
        if any(u.name == name for u in tvm.rec.users):
            raise ApiError(
                409, "NodeUserExists", f"the user {name!r} already exists on node {node!r}"
            )
        if len(tvm.rec.users) >= MAX_TVM_USERS:  # each one is an account on a shared host
            raise ApiError(409, "TooManyUsers", f"a node holds at most {MAX_TVM_USERS} node users")
        user = TvmUserRec(name=name, ssh_public_key=key, expiry=expiry, is_admin=is_admin)
        await self._put(pool, node, "add", user, pw_hash)
        url = f"{base()}/pools/{pool}/nodes/{node}/users/{name}"
        loc = url.encode()
        extra = [(b"location", loc), (b"dataserviceid", loc)]
        return empty(201, headers, extra)

    async def update(
        self, pool: str, node: str, user: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        b = parse_json(body)
        pw_hash, key, expiry = self._fields(b)
        b.log_unknown("node user update")
        tvm = self.core.get_tvm(pool, node)
        old = next((u for u in tvm.rec.users if u.name == user), None)
        is_admin = old.is_admin if old is not None else False
        rec = TvmUserRec(name=user, ssh_public_key=key, expiry=expiry, is_admin=is_admin)
        await self._put(pool, node, "update", rec, pw_hash)
        return empty(200, headers)

    async def delete(
        self, pool: str, node: str, user: str, headers: dict[str, str], **_: Any
    ) -> Response:
        tvm = self.core.get_tvm(pool, node)
        recorded = any(u.name == user for u in tvm.rec.users)
        try:
            await self._agent(
                pool, node, lambda rid: pm.NodeUserRequest(req_id=rid, op="delete", name=user)
            )
        except ApiError as exc:
            # Gone from the host already (removed at its expiry, or by hand): the record follows.
            if exc.code != "NodeUserNotFound" or not recorded:
                raise
        await self.svc.execute(self.core.forget_node_user, pool, node, user)
        return empty(200, headers)
