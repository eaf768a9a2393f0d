"""Where an agent keeps what. Two directories, never one inside the other's reach:

* the TVM root (`--root`, `WATASK_TVM_ROOT_DIR`): `tasks/`, `shared/`, `start/`, `certs/`, which task
  users must reach. Mode 0711: they may enter it (to their own directories) but not list it.
* the private directory (`--private-dir`, default `ROOT.private` beside the root): the agent's id,
  its credential and anything else secret. Mode 0700, owned by the agent, outside anything a file
  API serves. Older agents kept `agent-id` and `agent-credential` in the root; they are moved here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import uuid

# Files an older agent kept in the TVM root, where a task (or the TVM file API) could reach them.
MIGRATED = ("agent-id", "agent-credential")


class LayoutError(Exception):
    """The agent's directories cannot be made safe (another user's, a symlink, ...)."""


def default_private_dir(root: str) -> str:
    return os.path.abspath(root).rstrip(os.sep) + ".private"


def _own_dir(path: str, mode: int, what: str) -> None:
    """Create or repair `path` as a real directory of ours with exactly `mode`."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise LayoutError(f"cannot create the {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LayoutError(f"the {what} {path} is not a directory (or is a symlink)")
    if st.st_uid != os.geteuid():
        raise LayoutError(
            f"the {what} {path} belongs to uid {st.st_uid}, not to this agent (uid {os.geteuid()})"
        )
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def prepare_agent_dirs(root: str, private_dir: str = "") -> str:
    """Make the TVM root 0711 and the private directory 0700 (creating either), move private files
    an older agent left in the root, and return the private directory's absolute path."""
    root = os.path.abspath(root)
    private = os.path.abspath(private_dir) if private_dir else default_private_dir(root)
    if private == root or private.startswith(root + os.sep):
        raise LayoutError(
            f"the private directory {private} must not be inside the TVM root {root}: "
            "what is under the root is reachable by tasks and file APIs"
        )
    _own_dir(root, 0o711, "TVM root")
    _own_dir(private, 0o700, "agent private directory")
    for name in MIGRATED:
        old, new = os.path.join(root, name), os.path.join(private, name)
        if not os.path.lexists(old):
            continue
        if os.path.islink(old) or os.path.exists(new):
            os.unlink(old)  # the private copy wins; a link in the root is nothing of ours to follow
            continue
        try:
            os.replace(old, new)
        except OSError:  # another file system: copy privately, then drop the exposed copy
            shutil.copyfile(old, new + ".tmp")
            os.chmod(new + ".tmp", 0o600)
            os.replace(new + ".tmp", new)
            os.unlink(old)
        os.chmod(new, 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old + ".tmp")
    return private


def load_agent_id(private_dir: str) -> str:
    """The id this agent generated once and keeps (0600 in the private directory)."""
    path = os.path.join(private_dir, "agent-id")
    try:
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"{socket.gethostname()[:20]}-{uuid.uuid4().hex[:10]}"
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(path + ".tmp", path)
    return value
