"""Node users: Linux accounts the agent makes on its host for its TVM (the Azure API's node users,
the seed's remote-login users).

Several TVMs may share one host (the local provisioner runs many agents on one machine), so an
account belongs to this TVM only if this agent created it. The agent keeps a ledger of what it
created (name, uid and a random tag written into the account's comment) in its private directory:
- a name that exists on the host and is not in the ledger is refused (`NodeUserExists`): the agent
  never takes over an account it did not make (a system account, a person's, another TVM's); a
  leftover home directory of that name is refused the same way;
- update and delete touch only ledger accounts whose uid and tag still match (`NodeUserNotFound`
  otherwise);
- every ledger account is deleted when the TVM goes away (wipe: left pool, removed, deleted), when
  the agent joins another TVM (after a restart that lost track of the old one) and each at its
  expiry; an entry half-made by a crash is finished or dropped by its tag at start.
`isAdmin` would mean sudo, i.e. root on a host every TVM on it shares: refused unless the agent runs
with TVM_AGENT_ADMIN_NODE_USERS=1 (a host it has to itself); the account then joins `sudo`.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

import trio

from protocol import messages as pm

from ._users import validate_user_name

log = logging.getLogger("tvmagent.nodeusers")

LEDGER = "node-users.json"
ADMIN_ENV = "TVM_AGENT_ADMIN_NODE_USERS"
HOME_BASE = "/home"
_TAG = "tvm node user "
# A crypt(3) hash as useradd/usermod take it: no ':' (the shadow separator) and no newline.
_HASH = re.compile(r"\$[0-9a-z]+\$[./0-9A-Za-z$=,]{1,400}")
_KEY = re.compile(
    r"(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]{16,}"
    r"( [^\r\n]*)?"
)


class NodeUserError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _day(expiry: float) -> str:
    # The account itself expires at the end of that UTC day (day granularity); the agent deletes it
    # at `expiry` exactly.
    return time.strftime("%Y-%m-%d", time.gmtime(expiry + 86399))


def admin_allowed() -> bool:
    return os.environ.get(ADMIN_ENV, "") == "1"


class NodeUserLedger:
    """The accounts this agent created, and the blocking operations on them (run in a thread)."""

    def __init__(self, private_dir: str, home_base: str = HOME_BASE) -> None:
        self.path = os.path.join(private_dir, LEDGER)
        self.home_base = home_base
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, object]] = self._load()

    # ------------------------------------------------------------------ ledger file

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("node-user ledger %s unreadable (%s): starting empty", self.path, exc)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ ownership

    def _account(self, name: str) -> pwd.struct_passwd | None:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            return None

    def owned(self, name: str) -> pwd.struct_passwd | None:
        """The account, if this agent made it and it is still that account."""
        entry = self.entries.get(name)
        pw = self._account(name)
        if entry is None or pw is None or entry.get("state") != "created":
            return None
        if pw.pw_uid != entry.get("uid") or pw.pw_gecos != _TAG + str(entry.get("tag")):
            return None
        return pw

    def names(self) -> list[str]:
        return sorted(self.entries)

    def recover(self) -> None:
        """Finish or drop entries a crash left half-made; forget accounts someone else removed."""
        with self._lock:
            changed = False
            for name, entry in list(self.entries.items()):
                pw = self._account(name)
                mine = pw is not None and pw.pw_gecos == _TAG + str(entry.get("tag"))
                if entry.get("state") == "pending" and mine and pw is not None:
                    entry.update(state="created", uid=pw.pw_uid)
                    changed = True
                elif not mine or (entry.get("state") == "created" and self.owned(name) is None):
                    del self.entries[name]
                    changed = True
            if changed:
                self._save()

    # ------------------------------------------------------------------ operations

    def add(self, req: pm.NodeUserRequest, tvm: str = "", group: str = "") -> None:
        """Create the account; `group`: the TVM's pool group, as the tasks' (shared/ and the
        start task's files are the group's)."""
        _check(req)
        with self._lock:
            if self.owned(req.name) is not None:
                raise NodeUserError(
                    "NodeUserExists", f"the user {req.name!r} already exists on this node"
                )
            if self._account(req.name) is not None:
                raise NodeUserError(
                    "NodeUserExists",
                    f"an account named {req.name!r} already exists on this node's host and was "
                    "not created for this node: choose another name",
                )
            home = os.path.join(self.home_base, req.name)
            if os.path.lexists(home):
                raise NodeUserError(
                    "NodeUserExists",
                    f"{home} already exists on this node's host: choose another name",
                )
            tag = secrets.token_hex(8)
            # Recorded before the account exists, so a crash in between leaves a findable tag.
            self.entries[req.name] = {
                "state": "pending", "tag": tag, "expiry": req.expiry, "tvm": tvm,
            }  # fmt: skip
            self._save()
            argv = [
                _tool("useradd"), "--create-home", "--home-dir", home, "--shell", "/bin/bash",
                "--comment", _TAG + tag, "--expiredate", _day(req.expiry),
            ]  # fmt: skip
            if req.password_hash:
                argv += ["--password", req.password_hash]
            groups = (["sudo"] if req.is_admin else []) + ([group] if group else [])
            if groups:
                argv += ["--groups", ",".join(groups)]
            res = _run([*argv, req.name])
            if res.returncode != 0:
                del self.entries[req.name]
                self._save()
                if res.returncode == 9:  # another agent made it between our look and useradd
                    raise NodeUserError(
                        "NodeUserExists",
                        f"an account named {req.name!r} was just created on this node's host "
                        "by someone else: choose another name",
                    )
                raise NodeUserError(
                    "NodeUserCreateFailed",
                    f"useradd {req.name} failed ({res.returncode}): {res.stderr.strip()}",
                )
            pw = pwd.getpwnam(req.name)
            self.entries[req.name].update(state="created", uid=pw.pw_uid)
            self._save()
            try:
                _write_keys(pw, req.ssh_public_key)
            except OSError as exc:
                self._delete_locked(req.name)
                raise NodeUserError(
                    "NodeUserCreateFailed", f"cannot write {req.name}'s authorized_keys: {exc}"
                ) from exc

    def update(self, req: pm.NodeUserRequest) -> None:
        _check(req)
        with self._lock:
            pw = self.owned(req.name)
            if pw is None:
                raise _not_found(req.name)
            argv = [_tool("usermod"), "--expiredate", _day(req.expiry)]
            # No password given: the old one is removed (Azure's replace semantics); "!" = none.
            argv += ["--password", req.password_hash or "!"]
            res = _run([*argv, req.name])
            if res.returncode != 0:
                raise NodeUserError(
                    "NodeUserUpdateFailed",
                    f"usermod {req.name} failed ({res.returncode}): {res.stderr.strip()}",
                )
            _set_sudo(req.name, req.is_admin)
            self.entries[req.name]["expiry"] = req.expiry
            self._save()
            try:
                _write_keys(pw, req.ssh_public_key)
            except OSError as exc:
                raise NodeUserError(
                    "NodeUserUpdateFailed", f"cannot write {req.name}'s authorized_keys: {exc}"
                ) from exc

    def delete(self, name: str) -> None:
        validate_user_name(name)
        with self._lock:
            if self.owned(name) is None:
                raise _not_found(name)
            self._delete_locked(name)

    def _delete_locked(self, name: str) -> None:
        pw = self.owned(name)
        if pw is not None:
            if shutil.which("pkill"):  # userdel refuses a user with live processes
                _run(["pkill", "-KILL", "-U", str(pw.pw_uid)])
            res = _run([_tool("userdel"), "--remove", name])
            if res.returncode not in (0, 12):  # 12: the home could not be removed (gone)
                raise NodeUserError(
                    "NodeUserDeleteFailed",
                    f"userdel {name} failed ({res.returncode}): {res.stderr.strip()}",
                )
        self.entries.pop(name, None)
        self._save()

    def join_group(self, group: str, tvm: str) -> None:
        """TVM `tvm`'s accounts join its pool group (made again after an agent restart: the old
        one went with its members)."""
        with self._lock:
            for name, entry in self.entries.items():
                pw = self.owned(name)
                if entry.get("tvm") != tvm or pw is None:
                    continue
                res = _run([_tool("usermod"), "--append", "--groups", group, name])
                if res.returncode != 0:
                    log.error("node user %s not added to %s: %s", name, group, res.stderr.strip())

    def remove_all(self, keep_tvm: str | None = None) -> list[str]:
        """Delete every account this agent made (the TVM is going away), or all but those of TVM
        `keep_tvm`. Returns the names."""
        gone = []
        with self._lock:
            for name in list(self.entries):
                if keep_tvm is not None and self.entries[name].get("tvm") == keep_tvm:
                    continue
                try:
                    self._delete_locked(name)
                    gone.append(name)
                except NodeUserError as exc:
                    log.error("node user %s not removed: %s", name, exc.message)
        return gone

    def expiry_of(self, name: str) -> float | None:
        entry = self.entries.get(name)
        value = entry.get("expiry") if entry else None
        return float(value) if isinstance(value, (int, float)) else None


def _not_found(name: str) -> NodeUserError:
    return NodeUserError("NodeUserNotFound", f"the user {name!r} does not exist on this node")


def _check(req: pm.NodeUserRequest) -> None:
    try:
        validate_user_name(req.name)
    except ValueError as exc:
        raise NodeUserError("InvalidPropertyValue", str(exc)) from None
    if req.password_hash and not _HASH.fullmatch(req.password_hash):
        raise NodeUserError("InvalidPropertyValue", "the password hash is not a crypt(3) hash")
    key = req.ssh_public_key
    if key and (len(key) > 8192 or not _KEY.fullmatch(key)):
        raise NodeUserError("InvalidPropertyValue", "sshPublicKey is not one OpenSSH key line")
    if req.is_admin and not admin_allowed():
        raise NodeUserError(
            "InvalidPropertyValue",
            "isAdmin would give this user root (sudo) on a host other nodes share; this agent "
            f"grants it only when started with {ADMIN_ENV}=1 on a host it has to itself",
        )


def _set_sudo(name: str, admin: bool) -> None:
    try:
        members = grp.getgrnam("sudo").gr_mem
    except KeyError:
        if admin:
            raise NodeUserError("NodeUserUpdateFailed", "this host has no sudo group") from None
        return
    if admin and name not in members:
        _run([_tool("usermod"), "--append", "--groups", "sudo", name])
    elif not admin and name in members:
        _run(["gpasswd", "--delete", name, "sudo"])


def _write_keys(pw: pwd.struct_passwd, key: str) -> None:
    """~/.ssh/authorized_keys holding `key` (removed when empty), written through directory fds
    that follow no symlink: the home belongs to the user, who may have planted one."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    home = os.open(pw.pw_dir, flags)
    try:
        try:
            os.mkdir(".ssh", 0o700, dir_fd=home)
        except FileExistsError:
            pass
        ssh = os.open(".ssh", flags, dir_fd=home)
        try:
            st = os.fstat(ssh)
            if st.st_uid not in (0, pw.pw_uid):
                raise OSError(f"{pw.pw_dir}/.ssh belongs to uid {st.st_uid}")
            os.fchown(ssh, pw.pw_uid, pw.pw_gid)
            os.fchmod(ssh, 0o700)
            if not key:
                try:
                    os.unlink("authorized_keys", dir_fd=ssh)
                except FileNotFoundError:
                    pass
                return
            tmp = f".authorized_keys.{secrets.token_hex(4)}"
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                dir_fd=ssh,
            )  # fmt: skip
            with os.fdopen(fd, "w") as f:
                f.write(key.strip() + "\n")
                os.fchown(f.fileno(), pw.pw_uid, pw.pw_gid)
            os.rename(tmp, "authorized_keys", src_dir_fd=ssh, dst_dir_fd=ssh)
        finally:
            os.close(ssh)
    finally:
        os.close(home)


class NodeUsers:
    """The agent's side: answers NodeUserRequest, carries out the seed's AddUser/RemoveUser,
    deletes each user at its expiry and all of them when the TVM goes away."""

    def __init__(
        self,
        private_dir: str,
        send: Callable[[pm.Msg], None],
        nursery: Callable[[], trio.Nursery | None],
        current_tvm: Callable[[], str] = lambda: "",
        pool_group: Callable[[], str] = lambda: "",
    ) -> None:
        self.ledger = NodeUserLedger(private_dir)
        self._send = send
        self._nursery = nursery
        self._current_tvm = current_tvm
        self._pool_group = pool_group
        self.enabled = os.geteuid() == 0

    async def start(self) -> None:
        """At agent start: settle what a crash left, and arm the expiry of what remains."""
        if not self.enabled:
            return
        await trio.to_thread.run_sync(self.ledger.recover)
        for name in self.ledger.names():
            self._arm(name)

    def _arm(self, name: str) -> None:
        expiry = self.ledger.expiry_of(name)
        nursery = self._nursery()
        if expiry is not None and nursery is not None:
            nursery.start_soon(self._expire, name, expiry)

    async def _expire(self, name: str, expiry: float) -> None:
        await trio.sleep(max(0.0, expiry - time.time()))
        if self.ledger.expiry_of(name) == expiry:
            try:
                await trio.to_thread.run_sync(self.ledger.delete, name)
                log.info("node user %s expired and was removed", name)
            except NodeUserError as exc:
                log.warning("expired node user %s: %s", name, exc.message)

    async def _do(self, req: pm.NodeUserRequest) -> tuple[str, str]:
        if not self.enabled:
            return "NodeUserNotSupported", "the agent is not root: it cannot create accounts"
        try:
            if req.op == "add":
                await trio.to_thread.run_sync(
                    self.ledger.add, req, self._current_tvm(), self._pool_group()
                )
            elif req.op == "update":
                await trio.to_thread.run_sync(self.ledger.update, req)
            elif req.op == "delete":
                await trio.to_thread.run_sync(self.ledger.delete, req.name)
            else:
                return "InvalidRequest", f"unknown node-user operation {req.op!r}"
        except NodeUserError as exc:
            return exc.code, exc.message
        except (OSError, ValueError) as exc:
            return "NodeUserOperationFailed", str(exc)
        if req.op in ("add", "update"):
            self._arm(req.name)
        log.info("node user %s: %s done", req.name, req.op)
        return "", ""

    async def handle(self, req: pm.NodeUserRequest) -> None:
        code, message = await self._do(req)
        self._send(pm.NodeUserResponse(req_id=req.req_id, error_code=code, message=message))

    async def add_login_user(self, msg: pm.AddUser) -> None:
        """The seed's fire-and-forget AddUser: the same checks; a refusal is only logged."""
        req = pm.NodeUserRequest(
            req_id=0, op="add", name=msg.name, ssh_public_key=msg.ssh_public_key.strip(),
            expiry=msg.expiry, is_admin=msg.is_admin,
        )  # fmt: skip
        code, message = await self._do(req)
        if code:
            log.error("remote-login user %s not created: %s", msg.name, message)

    async def remove_login_user(self, name: str) -> None:
        code, message = await self._do(pm.NodeUserRequest(req_id=0, op="delete", name=name))
        if code and code != "NodeUserNotFound":
            log.error("remote-login user %s not removed: %s", name, message)

    async def remove_all(self, keep_tvm: str | None = None) -> None:
        """All of them (the TVM went away), or all but TVM `keep_tvm`'s (joining it: users of a
        TVM this agent backed before a restart go, as its wipe would have removed them)."""
        if self.enabled and self.ledger.entries:
            gone = await trio.to_thread.run_sync(self.ledger.remove_all, keep_tvm)
            if gone:
                log.info("node users of a TVM that went away removed: %s", ", ".join(gone))
