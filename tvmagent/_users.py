"""Linux task users and private directories."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess

# Debian's useradd default NAME_REGEX, minus the trailing "$" of machine accounts; 32 = utmp limit.
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def validate_user_name(name: object) -> str:
    """Return ``name`` if it is a valid Linux user name, else raise ValueError saying why."""
    if not isinstance(name, str):
        raise ValueError(f"user name must be a string, not {type(name).__name__}")
    if not _USER_RE.fullmatch(name):
        raise ValueError(
            f"invalid Linux user name {name!r}: use 1-32 characters, lowercase letters, digits,"
            " '_' or '-', starting with a letter or '_'"
        )
    return name


def lookup_user(name: str) -> tuple[int, int] | None:
    """(uid, primary gid) of an existing user, or None."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def ensure_user(name: str) -> tuple[int, int]:
    """Create an unprivileged system user (with its own group, no home, no login) if missing."""
    validate_user_name(name)
    existing = lookup_user(name)
    if existing is not None:
        return existing
    if os.geteuid() != 0:
        raise PermissionError(f"cannot create user {name!r}: the agent is not root")
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    res = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", nologin, name],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    # Exit 9 = "already exists": another agent on this host created it between our two looks.
    if res.returncode not in (0, 9):
        raise OSError(f"useradd {name} failed ({res.returncode}): {res.stderr.strip()}")
    created = lookup_user(name)
    if created is None:
        raise OSError(f"useradd {name} reported success but the user does not exist")
    return created


def prepare_private_dir(path: str, owner: str | None, mode: int = 0o750) -> None:
    """mkdir -p ``path``, give it to ``owner`` (user and its primary group), chmod ``mode``."""
    if not isinstance(path, str) or not path:
        raise ValueError("directory path must be a non-empty string")
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"invalid mode {mode!r}: expected an int in 0..0o7777")
    ids: tuple[int, int] | None = None
    if owner is not None:
        validate_user_name(owner)
        ids = lookup_user(owner)
        if ids is None:
            raise ValueError(f"unknown user {owner!r}")
    os.makedirs(path, exist_ok=True)
    if ids is not None and (os.stat(path).st_uid, os.stat(path).st_gid) != ids:
        os.chown(path, *ids)
    os.chmod(path, mode)
