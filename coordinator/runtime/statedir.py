"""The coordinator's state directory is private: account keys, agent credentials and job tokens are
in coordinator.db (and its WAL), the join token in clear in `join-token`. Task users on the same
host must not list, enter or read any of it, so the directory is 0700 and every file 0600,
whether it is new, was made by an older version, or was made by an operator with a loose umask.
"""

from __future__ import annotations

import os
import stat

PRIVATE_UMASK = 0o077
DB_NAME = "coordinator.db"
# SQLite creates -wal/-shm with the database file's mode, but an older version (or a copy made by
# hand) may have left them wider: each one is narrowed explicitly.
PRIVATE_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "join-token")
PRIVATE_DIRS = ("files",)


class StateDirError(Exception):
    """The state directory cannot be made private (not ours, not a directory, ...)."""


def make_private_dir(path: str) -> str:
    """Create `path` (and missing parents) or repair it: a directory owned by us, mode 0700.
    Returns the absolute path. A symlink, a non-directory or another user's directory is refused:
    chmod-ing through them would secure the wrong thing."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise StateDirError(
            f"cannot create the state directory {path}: {exc.strerror or exc}"
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {path} is not a directory (or is a symlink)")
    if st.st_uid != os.geteuid():
        raise StateDirError(
            f"state directory {path} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}): refusing to keep secrets there"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def secure_state_dir(state_dir: str) -> str:
    """Make the state directory private and narrow what is already in it. Creates an empty 0600
    coordinator.db when there is none, so SQLite's -wal and -shm inherit 0600 from their first
    byte on (SQLite gives them the database file's permissions)."""
    state_dir = make_private_dir(state_dir)
    db = os.path.join(state_dir, DB_NAME)
    fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    for name in PRIVATE_FILES:
        _narrow(os.path.join(state_dir, name), 0o600)
    for name in PRIVATE_DIRS:
        _narrow(os.path.join(state_dir, name), 0o700)
    return state_dir


def _narrow(path: str, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{path} is a symlink: refusing to use it as coordinator state")
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
