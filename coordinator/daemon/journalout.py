"""Where `tvm coordinator` puts its export lines when its stdout is the system journal.

Under systemd (the shipped unit) stdout goes to the journal, which members of the `adm` and
`systemd-journal` groups read: the account key and join token must not go there. systemd says
so in `$JOURNAL_STREAM` (the device and inode of the stream it connected to stdout); then the lines
go to a 0600 file in the state directory and stdout only names it.
"""

from __future__ import annotations

import os

EXPORTS_FILE = "exports.env"


def stdout_is_journal(fd: int = 1) -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def write_exports(state_dir: str, text: str) -> str:
    """`text` in STATE_DIR/exports.env (0600, replaced whole); its path."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.abspath(os.path.join(state_dir, EXPORTS_FILE))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def print_exports(state_dir: str, text: str) -> None:
    """The export lines on stdout, flushed; into STATE_DIR/exports.env when stdout is the journal."""
    import sys

    if stdout_is_journal():
        path = write_exports(state_dir, text)
        text = f"# stdout is the system journal: the export lines are in {path} (0600)\n"
    sys.stdout.write(text)
    sys.stdout.flush()
