"""Who a task runs as, and the Linux users behind remote login (issue 8).

Task users (root agents only). Decision: one Linux user PER RUNNING TASK, taken from a host-wide
pool of "slot users" ``tvmslot0``, ``tvmslot1``, ... Each runs with its own group (``tvmslotN``,
which grants nothing) as primary group, plus the group of the pool the TVM is in as the only
supplementary group (``tvmp-<hash>``, created when the agent joins the pool, deleted when it leaves):

* A task's directory is ``0700`` owned by its slot user, so a sibling task (another uid) cannot
  even enter it, let alone read its stdout. Finished tasks' directories are handed back to root
  (``0700 root:root``), so the next task that gets the same slot user cannot read them either.
* Things only the pool's tasks may read are the pool group's: ``certs/`` (0750 dir, 0640 files,
  owner root) and ``start/`` (0750, owned by the start task's user, whose lease is held while the
  TVM is in the pool so no later task runs as that uid). ``shared/`` (3770: setgid, sticky) and
  ``tasks/`` (0750) are the group's too, so its tasks share them. A task of another TVM on the same
  host (another agent, another pool group) lists and reads none of them. The TVM's node users are
  in the group; an agent that stops gives the directories back to root before its group goes.
* Hosts set up by older agents have slot users whose passwd group is ``tvmtasks`` (or a group that
  no longer exists): they are adopted as they are, the passwd group is never used at launch.
* Tasks run with no_new_privs (the launcher sets it after the switch to the task user): a setuid
  file of a slot user, left in shared/ by a task of the pool, does not turn a later task into that
  slot user, which may run another tenant's task by then.
* Task users may not schedule work for later (named in /etc/cron.deny and /etc/at.deny): a crontab
  or at job would run as the uid outside the task's cgroup, when it may run another tenant's task.
* Before a uid is given to another task, what the last one left in /tmp, /var/tmp, /dev/shm,
  /dev/mqueue and /run/lock (and the cron, at and mail spools) is removed (_uid_sweep.py), its
  System V IPC objects and kernel keyrings emptied (_ipc_sweep.py, _keyrings.py), and, where no
  cgroup held the task's tree, its remaining processes are killed. The lock file says "dirty" until that is done, so a crashed
  agent's leftovers are swept by whoever takes the uid next.
* A slot user is held with an ``flock`` on ``/run/tvm-agent/slots/<user>.lock`` while a task
  runs as it, so two agents on one host never give the same uid to two live tasks. The kernel
  drops the lock when the agent dies; the pool is small and reused, so the host's system-uid
  range is not used up by agents that come and go (tests start hundreds).
* ``--task-user NAME`` replaces all this with one fixed user (operator's choice: tasks of the
  TVM then share a uid and can read each other's files; certificates are 0600/0700 owned by it).
* runElevated tasks run as root. A non-root agent runs everything as itself (said at start).

Remote-login (node) users are ``tvmagent/nodeusers.py``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import logging
import os
import pwd
import random
import shutil
import subprocess
import time
from dataclasses import dataclass

from ._uid_sweep import deny_schedulers
from ._users import lookup_user, validate_user_name

log = logging.getLogger("tvm.agent")

TASK_GROUP = "tvmtasks"  # the shared group of older agents; no longer granted anything
POOL_GROUP_PREFIX = "tvmp-"
SLOT_PREFIX = "tvmslot"
LOCK_DIR = "/run/tvm-agent/slots"
MAX_SLOT_USERS = 512
BROKEN_RECHECK_S = 60.0


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def ensure_group(name: str) -> int:
    """The gid of group `name`, made on demand with a gid no other group has and no user has as its
    passwd group. groupadd alone may take the dangling primary gid of some user (its group deleted),
    which would make the group that user's; and groupadd checks an explicit gid before it takes its
    lock, so two agents may both get the same one: each checks afterwards, and the one that finds a
    twin deletes its own group and tries another gid."""
    for _ in range(20):
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            gid = None
        if gid is not None:
            if _gid_unique(gid):
                return gid
            res = _run(
                [shutil.which("groupdel") or "/usr/sbin/groupdel", name]
            )  # a twin: ours goes
            if res.returncode not in (0, 6):  # e.g. 8: some user's passwd group, cannot be replaced
                raise OSError(
                    f"group {name} shares gid {gid} with another group and cannot be deleted "
                    f"({res.returncode}): {res.stderr.strip()}"
                )
            time.sleep(random.random() * 0.05)
            continue
        used = {g.gr_gid for g in grp.getgrall()} | {p.pw_gid for p in pwd.getpwall()}
        free = [g for g in range(100, 1000) if g not in used]
        if not free:
            raise OSError(f"groupadd {name}: no free system gid")
        res = _run(
            [
                shutil.which("groupadd") or "/usr/sbin/groupadd",
                "--system",
                "--gid",
                str(random.choice(free)),
                name,
            ]
        )
        if res.returncode not in (0, 4, 9):  # 4: gid taken meanwhile; 9: name made meanwhile
            raise OSError(f"groupadd {name} failed ({res.returncode}): {res.stderr.strip()}")
    raise OSError(f"groupadd {name}: no gid of its own after 20 attempts")


def _gid_unique(gid: int) -> bool:
    return sum(1 for g in grp.getgrall() if g.gr_gid == gid) == 1


_denied: set[str] = set()  # slot users named in cron.deny and at.deny by this process


def ensure_slot_user(name: str) -> tuple[int, int]:
    """(uid, gid) of slot user `name`, created on demand; gid is the user's own group ``name``.

    An existing user keeps its passwd entry (older agents gave it ``tvmtasks``; its group may even
    be gone): the task runs with the own group anyway, so a stale passwd group cannot wedge it."""
    validate_user_name(name)
    if name not in _denied:
        try:
            deny_schedulers(name)
            _denied.add(name)
        except OSError as exc:  # a read-only /etc: the spool sweep still removes what it left
            log.warning("task user %s not named in cron.deny/at.deny: %s", name, exc)
    existing = lookup_user(name)
    if existing is not None:
        try:
            return existing[0], ensure_group(name)
        except OSError as exc:
            # No own group can be made: its passwd group will do if it exists (it grants
            # nothing); a gid without a group (getgrgid fails) is refused, the caller skips it.
            try:
                grp.getgrgid(existing[1])
            except KeyError:
                raise OSError(
                    f"task user {name}: its own group cannot be made ({exc}) and its passwd "
                    f"group {existing[1]} does not exist"
                ) from None
            return existing
    gid = ensure_group(name)
    res = _run(
        [
            shutil.which("useradd") or "/usr/sbin/useradd",
            "--system",
            "--gid",
            str(gid),
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            shutil.which("nologin") or "/usr/sbin/nologin",
            name,
        ]
    )
    if res.returncode not in (0, 9):
        raise OSError(f"useradd {name} failed ({res.returncode}): {res.stderr.strip()}")
    created = lookup_user(name)
    if created is None:
        raise OSError(f"useradd {name} reported success but the user does not exist")
    return created[0], gid


def pool_group_name(agent_id: str, account: str, pool: str, tvm_name: str) -> str:
    """The group of one agent's membership in one pool: a new one per join, so a process that
    somehow survived the last membership does not get the next pool's certificates."""
    digest = hashlib.sha256(f"{agent_id}\n{account}\n{pool}\n{tvm_name}".encode()).hexdigest()
    return POOL_GROUP_PREFIX + digest[:16]


def remove_group(name: str) -> bool:
    """groupdel a pool group the agent made; False when it was not there."""
    if not name.startswith(POOL_GROUP_PREFIX):
        raise ValueError(f"refusing to delete group {name!r}: not a pool group")
    if not _group_exists(name):
        return False
    for attempt in range(10):
        res = _run([shutil.which("groupdel") or "/usr/sbin/groupdel", name])
        if res.returncode in (0, 6):  # 6: deleted meanwhile
            return True
        if res.returncode != 10:  # 10: /etc/group locked by another useradd/groupadd: try again
            break
        time.sleep(0.1 * (attempt + 1))
    raise OSError(f"groupdel {name} failed ({res.returncode}): {res.stderr.strip()}")


_DIRTY = b"dirty"


@dataclass
class SlotLease:
    user: str
    uid: int
    gid: int  # the user's own group: the task's primary group
    fd: int
    # What the writable directories looked like when its task started (_uid_sweep.TmpWatch).
    tmp_base: dict[str, tuple[int, int]] | None = None

    def release(self, clean: bool = False) -> None:
        """Give the uid back; `clean`: its leftovers are gone (else the next holder sweeps)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                if clean:
                    os.ftruncate(self.fd, 0)
                os.close(self.fd)  # closing drops the flock
            self.fd = -1


class SlotUsers:
    """Host-wide pool of task users; `acquire()` blocks nothing (it tries the next name)."""

    def __init__(
        self, lock_dir: str = LOCK_DIR, prefix: str = SLOT_PREFIX, limit: int = MAX_SLOT_USERS
    ) -> None:
        self.lock_dir = lock_dir
        self.prefix = prefix
        self.limit = limit
        # Slot users left broken by earlier runs that could not be repaired: skipped (and reported
        # as a degraded mode), never a wedged TVM.
        self.broken: dict[str, str] = {}
        self._broken_at: dict[str, float] = {}  # looked at again after BROKEN_RECHECK_S

    def acquire(self) -> SlotLease:
        """A free slot user. Its lock file says "dirty" while a task may have left something as
        it: a holder that died before its cleanup leaves the sweep to this one."""
        from ._uid_sweep import cleanup_uid

        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        for i in range(self.limit):
            name = f"{self.prefix}{i}"
            if time.monotonic() - self._broken_at.get(name, -BROKEN_RECHECK_S) < BROKEN_RECHECK_S:
                continue  # repairing it failed a moment ago: not on every task
            fd = os.open(
                os.path.join(self.lock_dir, name + ".lock"),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                uid, gid = ensure_slot_user(name)
            except OSError as exc:
                os.close(fd)
                self.broken[name] = str(exc)
                self._broken_at[name] = time.monotonic()
                continue
            except BaseException:
                os.close(fd)
                raise
            self.broken.pop(name, None)
            self._broken_at.pop(name, None)
            try:
                if os.pread(fd, len(_DIRTY), 0) == _DIRTY:
                    cleanup_uid(uid, gid)
                else:
                    os.pwrite(fd, _DIRTY, 0)
            except BaseException:
                os.close(fd)
                raise
            return SlotLease(name, uid, gid, fd)
        if self.broken:
            first = min(self.broken)
            raise OSError(
                f"no usable task user on this host: {len(self.broken)} broken (first: "
                f"{self.broken[first]}), the others busy"
            )
        raise OSError(f"all {self.limit} task users on this host are busy")


def untraversable_parent(path: str) -> str | None:
    """The first directory above `path` that other users may not enter, or None."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def chown_tree(path: str, uid: int, gid: int) -> None:
    """chown -R without following symlinks (a task may plant links to files it must not own).

    Files with more than one hard link are left alone: resource files are hard links into the
    download cache, and owning one would let a task change the cached bytes the next task gets.
    They stay root's and read-only; the task, owning the directory, may still replace them."""
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(p)
                if n in filenames and st.st_nlink > 1 and not os.path.islink(p):
                    continue
                os.lchown(p, uid, gid)


def share_certs_with_group(certs_dir: str, gid: int) -> None:
    """certs/ readable by every task user of the TVM: dir 0750, files 0640 (0644 stays), owner root."""
    os.chown(certs_dir, 0, gid)
    os.chmod(certs_dir, 0o750)
    for name in os.listdir(certs_dir):
        p = os.path.join(certs_dir, name)
        st = os.lstat(p)
        os.lchown(p, 0, gid)
        if st.st_mode & 0o777 == 0o600:
            os.chmod(p, 0o640)


def group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _group_exists(name: str) -> bool:
    return group_gid(name) is not None
