"""Operations on one TVM: reboot, reimage, disable/enable scheduling, delete, remote-login users.

Remote-login users are kept on the TVM record and pushed to the agent (AddUser/RemoveUser).
"""

from __future__ import annotations

import re

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import parse_time
from protocol import messages as pm

from .instructions import Outbox
from .membership import Membership
from .pools import Pools, check_option
from .records import Tvm, TvmUserRec
from .runs import Runs
from .store import Store

MAX_TVM_USERS = 20
MAX_USER_LIFETIME_S = 30 * 86400.0
DEFAULT_USER_LIFETIME_S = 86400.0

# Operations on a TVM and the states they are refused in (reference §2.2).
_BUSY_CODES = {
    "rebooting": "TVMBeingRebooted",
    "reimaging": "TVMBeingReimaged",
    "leavingpool": "TVMLeavingPool",
    "starting": "TVMNotReady",
    "creating": "TVMNotReady",
    "unknown": "TVMStateUnknown",
}
_OPERABLE = ("idle", "running", "offline", "starttaskfailed", "waitingforstarttask", "unusable")

_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Names the agent must never touch: system accounts and our own task users.
_RESERVED_USERS = frozenset(
    {"root", "daemon", "bin", "sys", "sync", "nobody", "sshd", "messagebus", "systemd-network"}
)
_SSH_KEY = re.compile(
    r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]{16,}( [^\r\n]*)?$"
)


class TvmOps:
    def __init__(
        self, store: Store, out: Outbox, runs: Runs, membership: Membership, pools: Pools
    ) -> None:
        self.s = store
        self.out = out
        self.runs = runs
        self.membership = membership
        self.pools = pools

    def _tvm_for_op(self, pool: str, name: str, allowed: tuple[str, ...]) -> Tvm:
        self.pools.active_pool(pool)
        tvm = self.s.get_tvm(pool, name)
        if tvm.rec.pending_op in ("leave", "leaving"):
            raise ApiError(409, "TVMLeavingPool", f"TVM {name!r} is leaving the pool", name=name)
        if tvm.rec.state not in allowed:
            code = _BUSY_CODES.get(tvm.rec.state, "TVMInvalidState")
            raise ApiError(
                409,
                code,
                f"TVM {name!r} is {tvm.rec.state}; this operation needs one of: "
                + ", ".join(allowed),
                name=name,
                state=tvm.rec.state,
            )
        return tvm

    def reboot_tvm(self, pool: str, name: str, req: m.TvmReboot | None = None) -> None:
        self._restart_tvm(
            pool, name, (req or m.TvmReboot()).tvm_reboot_option, "tvmRebootOption", False
        )

    def reimage_tvm(self, pool: str, name: str, req: m.TvmReimage | None = None) -> None:
        self._restart_tvm(
            pool, name, (req or m.TvmReimage()).tvm_reimage_option, "tvmReimageOption", True
        )

    def _restart_tvm(self, pool: str, name: str, option: str, field: str, reimage: bool) -> None:
        tvm = self._tvm_for_op(pool, name, _OPERABLE)
        option = check_option(option, field)
        op = "reimage" if reimage else "reboot"
        self.runs.set_tvm_state(tvm, "reimaging" if reimage else "rebooting")
        tvm.rec.booted = self.s.clock()
        tvm.rec.pending_op = op
        tvm.rec.pending_option = option
        self.out.put("tvm", name, tvm.rec)
        if option != "taskcompletion":
            self.membership.evict(tvm, option, f"TVM {op}")
        self.membership.advance(tvm)

    def disable_scheduling(
        self, pool: str, name: str, req: m.TvmDisableScheduling | None = None
    ) -> None:
        tvm = self._tvm_for_op(pool, name, _OPERABLE)
        option = check_option(
            (req or m.TvmDisableScheduling()).tvm_disable_scheduling_option,
            "tvmDisableSchedulingOption",
        )
        if tvm.rec.scheduling == "disabled":
            raise ApiError(
                409,
                "TVMAlreadyInTargetSchedulingState",
                f"scheduling on TVM {name!r} is already disabled",
                name=name,
            )
        tvm.rec.scheduling = "disabled"
        if tvm.rec.state in ("idle", "running"):
            if option != "taskcompletion":
                self.membership.evict(tvm, option, "scheduling disabled on the TVM")
            tvm.rec.pending_op = "offline"
            tvm.rec.pending_option = option
        self.out.put("tvm", name, tvm.rec)
        self.membership.advance(tvm)

    def enable_scheduling(self, pool: str, name: str) -> None:
        self.pools.active_pool(pool)
        tvm = self.s.get_tvm(pool, name)
        if tvm.rec.scheduling == "enabled":
            raise ApiError(
                409,
                "TVMAlreadyInTargetSchedulingState",
                f"scheduling on TVM {name!r} is already enabled",
                name=name,
            )
        tvm.rec.scheduling = "enabled"
        if tvm.rec.pending_op == "offline":
            tvm.rec.pending_op = ""
        if tvm.rec.state == "offline":
            self.runs.set_tvm_state(tvm, "running" if tvm.running else "idle")
        self.out.put("tvm", name, tvm.rec)

    def delete_tvm(self, pool: str, name: str, option: str = "requeue") -> None:
        """Remove one TVM (the pool's target shrinks by one); what ran there is requeued by default."""
        self.pools.active_pool(pool)
        self.s.get_tvm(pool, name)
        self.pools.remove_tvms(pool, m.TvmRemove(tvm_names=[name], tvm_deallocation_option=option))

    # ------------------------------------------------------------------ remote-login users

    def add_tvm_user(self, pool: str, tvm_name: str, req: m.TvmUserAdd) -> TvmUserRec:
        tvm = self.s.get_tvm(pool, tvm_name)
        if not isinstance(req.name, str) or not _LINUX_USER.fullmatch(req.name):
            raise bad_request(
                "InvalidUserName",
                f"{req.name!r} is not a valid Linux user name: 1-32 characters, lowercase letters,"
                " digits, '_' or '-', starting with a letter or '_'",
                field="name",
            )
        if req.name in _RESERVED_USERS or req.name.startswith("tvm"):
            raise bad_request(
                "InvalidUserName", f"user name {req.name!r} is reserved", field="name"
            )
        key = req.ssh_public_key.strip()
        if len(key) > 8192 or not _SSH_KEY.fullmatch(key):
            raise bad_request(
                "InvalidSshPublicKey",
                "sshPublicKey must be one OpenSSH public key line like 'ssh-ed25519 AAAA... comment'",
                field="sshPublicKey",
            )
        now = self.s.clock()
        expiry = (
            parse_time(req.expiry_time, "expiryTime")
            if req.expiry_time
            else now + DEFAULT_USER_LIFETIME_S
        )
        if expiry <= now:
            raise bad_request(
                "InvalidPropertyValue", "expiryTime must be in the future", field="expiryTime"
            )
        if expiry - now > MAX_USER_LIFETIME_S:
            raise bad_request(
                "InvalidPropertyValue",
                "expiryTime may be at most 30 days ahead",
                field="expiryTime",
            )
        if any(u.name == req.name for u in tvm.rec.users):
            raise ApiError(
                409,
                "UserExists",
                f"user {req.name!r} already exists on TVM {tvm_name!r}",
                name=req.name,
            )
        if len(tvm.rec.users) >= MAX_TVM_USERS:
            raise ApiError(
                409, "TooManyUsers", f"a TVM holds at most {MAX_TVM_USERS} remote-login users"
            )
        user = TvmUserRec(name=req.name, ssh_public_key=key, expiry=expiry, is_admin=req.is_admin)
        tvm.rec.users = [*tvm.rec.users, user]
        self.out.put("tvm", tvm.rec.name, tvm.rec)
        self.out.send(
            tvm.rec.agent_id,
            pm.AddUser(name=user.name, ssh_public_key=key, expiry=expiry, is_admin=user.is_admin),
        )
        return user

    def delete_tvm_user(self, pool: str, tvm_name: str, user: str) -> None:
        tvm = self.s.get_tvm(pool, tvm_name)
        if not any(u.name == user for u in tvm.rec.users):
            raise ApiError(
                404, "UserNotFound", f"user {user!r} does not exist on TVM {tvm_name!r}", name=user
            )
        tvm.rec.users = [u for u in tvm.rec.users if u.name != user]
        self.out.put("tvm", tvm.rec.name, tvm.rec)
        self.out.send(tvm.rec.agent_id, pm.RemoveUser(name=user))

    def check_node_user_key(self, key: str) -> None:
        """An Azure node user's sshPublicKey ("" = none): one OpenSSH public key line."""
        if key and (len(key) > 8192 or not _SSH_KEY.fullmatch(key)):
            raise bad_request(
                "InvalidPropertyValue",
                "sshPublicKey must be one OpenSSH public key line like 'ssh-ed25519 AAAA... comment'",
                field="sshPublicKey",
                value="",
            )

    def check_node_user_name(self, name: str) -> None:
        """The name rules of remote-login users, for the Azure node users (400 naming `name`)."""
        if not _LINUX_USER.fullmatch(name) or name in _RESERVED_USERS or name.startswith("tvm"):
            raise bad_request(
                "InvalidPropertyValue",
                f"{name!r} is not a usable Linux user name: 1-32 characters, lowercase letters,"
                " digits, '_' or '-', starting with a letter or '_', not a system name or tvm*",
                field="name",
                value=name,
            )

    def record_node_user(self, pool: str, tvm_name: str, user: TvmUserRec) -> None:
        """A node user the agent has made (or replaced): kept on the TVM record, no message."""
        tvm = self.s.get_tvm(pool, tvm_name)
        tvm.rec.users = [*(u for u in tvm.rec.users if u.name != user.name), user]
        self.out.put("tvm", tvm.rec.name, tvm.rec)

    def forget_node_user(self, pool: str, tvm_name: str, name: str) -> None:
        """A node user the agent has deleted."""
        tvm = self.s.get_tvm(pool, tvm_name)
        if any(u.name == name for u in tvm.rec.users):
            tvm.rec.users = [u for u in tvm.rec.users if u.name != name]
            self.out.put("tvm", tvm.rec.name, tvm.rec)

    def expire_users(self) -> None:
        """Drop users whose expiry passed (the agent removes them on its own too)."""
        now = self.s.clock()
        for tvm in self.s.tvms.values():
            gone = [u for u in tvm.rec.users if u.expiry <= now]
            if gone:
                tvm.rec.users = [u for u in tvm.rec.users if u.expiry > now]
                self.out.put("tvm", tvm.rec.name, tvm.rec)
                for u in gone:
                    self.out.send(tvm.rec.agent_id, pm.RemoveUser(name=u.name))
