"""The agent's file APIs (task files and TVM files), confined with directory descriptors.

The agent runs as root and tasks control what is inside their own directories, so a path string
checked with realpath and then opened is a race (a task swaps a directory for a symlink between the
check and the open) and a symlink in a task's directory would be followed to anything on the host.
Here every path is opened beneath a directory fd with `openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, or, where the kernel has no openat2, by a walk from
that fd opening one component at a time with `O_NOFOLLOW | O_DIRECTORY`. Sizes and times come from
`fstat` of the opened fd and data from `pread` on it, so what is checked is what is served.

What is served:
- a path under `tasks/<wi>/<job>/<task>/` is confined to that task's directory (its fd is the
  base), so a task's path can never reach another task's files;
- the TVM file API serves only `tasks/`, `shared/` and `start/` (the seed's node directories);
  anything else under the TVM root (the agent's credential and id, `certs/`, `cache/`, retention
  bookkeeping beside task directories) is refused with `FilePathForbidden` or not found;
- a symbolic link anywhere in a path is refused with `SymbolicLinkNotFollowed`; FIFOs, sockets and
  devices with `NotARegularFile` (opened with O_NONBLOCK, so a FIFO cannot hang the agent);
- listings walk directory fds and never follow links: they show directories and regular files
  only (symbolic links and special files are left out, as a GET of them is refused), with sizes and
  times from `fstatat(AT_SYMLINK_NOFOLLOW)`, at most `MAX_ENTRIES` entries.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

from protocol import messages as pm

MAX_READ = 4 * 1024 * 1024
MAX_ENTRIES = 100_000
SERVED_AREAS = ("shared", "start", "tasks")
PATH_MAX = 4096
TASK_LEVEL = 4  # tasks/<wi>/<job>/<task>: the levels above a task directory are the agent's own

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# openat2 has the same number on every architecture that uses the common syscall table (x86_64,
# aarch64, arm, riscv, ppc, s390x, i386); elsewhere the O_NOFOLLOW walk is used.
_OPENAT2_NR = {
    "x86_64": 437,
    "aarch64": 437,
    "arm64": 437,
    "armv7l": 437,
    "armv8l": 437,
    "riscv64": 437,
    "ppc64le": 437,
    "ppc64": 437,
    "s390x": 437,
    "i686": 437,
    "i386": 437,
}.get(platform.machine())
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO (or a file with a lease) must not block the agent's thread.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_usable: bool | None = None  # probed once: None until then


def _openat2(dir_fd: int, rel: str, flags: int) -> int:
    how = _OpenHow(flags, 0, _RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(_OPENAT2_NR or -1),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(rel)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def openat2_usable() -> bool:
    """Whether this kernel (and any seccomp filter around us) lets openat2 with our flags through."""
    global _openat2_usable
    if _openat2_usable is None:
        if _OPENAT2_NR is None:
            _openat2_usable = False
        else:
            probe = os.open("/", _DIR_FLAGS)
            try:
                os.close(_openat2(probe, ".", _DIR_FLAGS))
                _openat2_usable = True
            except OSError as exc:
                # ENOSYS: no openat2 (< 5.6); EPERM: a container's seccomp filter; E2BIG/EINVAL: flags unknown.
                if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.E2BIG, errno.EINVAL):
                    raise
                _openat2_usable = False
            finally:
                os.close(probe)
    return _openat2_usable


def _walk_open(dir_fd: int, parts: list[str], flags: int) -> int:
    """openat2's confinement by hand: one component at a time from `dir_fd`, never following a link."""
    fd = dir_fd
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(name, (flags if last else _DIR_FLAGS) | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                # O_NOFOLLOW | O_DIRECTORY on a link says ENOTDIR: report it as the link it is.
                if exc.errno == errno.ENOTDIR and _is_link(fd, name):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
        return fd if fd != dir_fd else os.dup(dir_fd)
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_beneath(dir_fd: int, parts: list[str], flags: int) -> int:
    """Open the relative path `parts` beneath `dir_fd`; a symlink anywhere on it is ELOOP.

    `parts` must be plain names (no '', '.', '..', '/'), which `split_path` guarantees."""
    if not parts:
        return os.dup(dir_fd)
    if openat2_usable():
        for _ in range(3):
            try:
                # RESOLVE_NO_SYMLINKS covers the final component too, with ELOOP (O_NOFOLLOW |
                # O_DIRECTORY on a link would say ENOTDIR instead).
                return _openat2(dir_fd, "/".join(parts), flags & ~os.O_NOFOLLOW)
            except OSError as exc:
                if (
                    exc.errno != errno.EAGAIN
                ):  # EAGAIN: a concurrent rename; the kernel asks to retry
                    raise
    return _walk_open(dir_fd, parts, flags)


def split_path(path: str) -> list[str]:
    """A file API path as plain components; '', '.' dropped; '..', absolute paths and NUL refused."""
    if "\0" in path:
        raise FileApiError("InvalidFilePath", "file paths may not contain NUL")
    if len(os.fsencode(path)) >= PATH_MAX:  # openat2 would say ENAMETOOLONG; the walk says the same
        raise FileApiError("InvalidFilePath", f"{path[:80]}…: path too long")
    if path.startswith("/"):
        raise FileApiError("InvalidFilePath", f"{path!r}: file paths are relative")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FileApiError("InvalidFilePath", "file paths may not contain '..'")
    return parts


def _translate(exc: OSError, path: str) -> FileApiError | OSError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileApiError("FileNotFound", f"{path} does not exist")
    if exc.errno == errno.ELOOP:
        return FileApiError(
            "SymbolicLinkNotFollowed",
            f"{path}: the file API does not follow symbolic links (the path is or passes through one)",
        )
    if exc.errno == errno.ENXIO:  # a socket (or a device with no driver behind it)
        return FileApiError(
            "NotARegularFile", f"{path} is not a regular file (FIFO, socket or device)"
        )
    if exc.errno == errno.EXDEV:
        return FileApiError(
            "FilePathForbidden", f"{path} leads outside the directory it is served from"
        )
    if exc.errno == errno.ENAMETOOLONG:
        return FileApiError("InvalidFilePath", f"{path[:80]}…: path too long")
    return exc


class _Fds:
    """Directory fds opened for one request, all closed at its end."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def serve(root: str, req: pm.FileRequest, *, cleaned_marker: str) -> pm.FileResponse:
    """Answer one file request under the TVM root `root` (blocking: run it in a thread).

    `cleaned_marker` is the suffix of the file the agent leaves beside a task directory whose
    retention time ran out, so such a task answers TaskFilesCleanedUp rather than FileNotFound."""
    fds = _Fds()
    try:
        return _serve(root, req, cleaned_marker, fds)
    except FileApiError as exc:
        return pm.FileResponse(req_id=req.req_id, error_code=exc.code, message=exc.message)
    finally:
        fds.close()


def _serve(root: str, req: pm.FileRequest, marker: str, fds: _Fds) -> pm.FileResponse:
    if req.op not in ("list", "read", "stat", "delete"):
        raise FileApiError("UnknownOperation", req.op)
    parts = split_path(req.path)
    if parts and parts[0] not in SERVED_AREAS:
        raise FileApiError(
            "FilePathForbidden",
            f"{req.path}: the TVM file API serves only tasks/, shared/ and start/",
        )
    root_fd = fds.keep(os.open(root, _DIR_FLAGS))
    try:
        if not parts or (parts[0] == "tasks" and len(parts) < TASK_LEVEL):
            # The TVM root and the agent-made levels above task directories: directories only.
            fd = fds.keep(open_beneath(root_fd, parts, _DIR_FLAGS))
            if req.op != "list":
                raise FileApiError("FileIsDirectory", f"{req.path or '/'} is a directory")
            entries: list[pm.FileEntry] = []
            _list_levels(fd, len(parts), "", req.recursive, entries)
            return pm.FileResponse(req_id=req.req_id, entries=entries)
        base = fds.keep(_open_base(root_fd, parts, marker, req.path))
        rest = parts[TASK_LEVEL:] if parts[0] == "tasks" else parts[1:]
        if req.op == "delete":
            _delete(base, rest, req.path)
            return pm.FileResponse(req_id=req.req_id)
        if req.op == "list":
            try:
                fd = fds.keep(open_beneath(base, rest, _DIR_FLAGS))
            except NotADirectoryError:
                # A file (say so), a link or a missing parent (opening it says which).
                os.close(open_beneath(base, rest, _FILE_FLAGS))
                raise FileApiError("NotADirectory", f"{req.path} is not a directory") from None
            entries = []
            _walk(fd, "", req.recursive, entries)
            return pm.FileResponse(req_id=req.req_id, entries=entries)
        fd = fds.keep(open_beneath(base, rest, _FILE_FLAGS))
    except OSError as exc:
        raise _translate(exc, req.path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise FileApiError("FileIsDirectory", f"{req.path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise FileApiError(
            "NotARegularFile", f"{req.path} is not a regular file (FIFO, socket or device)"
        )
    if req.op == "stat":
        return pm.FileResponse(req_id=req.req_id, size=st.st_size, mtime=st.st_mtime)
    if req.offset < 0:
        raise FileApiError("InvalidRange", f"offset {req.offset} is negative")
    want = min(req.length if req.length >= 0 else MAX_READ, MAX_READ)
    return pm.FileResponse(
        req_id=req.req_id, data=_pread(fd, want, req.offset), size=st.st_size, mtime=st.st_mtime
    )


def _delete(base: int, rest: list[str], path: str) -> None:
    """Unlink one regular file beneath `base` (its parent opened confined; the name itself is
    removed with unlinkat, so a link put there is never followed). Directories stay."""
    if not rest:
        raise FileApiError("FileIsDirectory", f"{path} is a directory; only files can be deleted")
    parent = open_beneath(base, rest[:-1], _DIR_FLAGS)
    try:
        mode = os.stat(rest[-1], dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            raise FileApiError(
                "FileIsDirectory", f"{path} is a directory; only files can be deleted"
            )
        if stat.S_ISLNK(mode):
            raise FileApiError("SymbolicLinkNotFollowed", f"{path} is a symbolic link")
        if not stat.S_ISREG(mode):
            raise FileApiError("NotARegularFile", f"{path} is not a regular file")
        os.unlink(rest[-1], dir_fd=parent)
    finally:
        os.close(parent)


def _open_base(root_fd: int, parts: list[str], marker: str, path: str) -> int:
    """The fd a request is confined to: the task's own directory, or `shared/` / `start/`."""
    if parts[0] != "tasks":
        return open_beneath(root_fd, parts[:1], _DIR_FLAGS)
    job_fd = open_beneath(root_fd, parts[: TASK_LEVEL - 1], _DIR_FLAGS)
    try:
        task = parts[TASK_LEVEL - 1]
        if _exists(job_fd, task + marker):
            raise FileApiError(
                "TaskFilesCleanedUp", "the task's files were cleaned up after its retention time"
            )
        # A task directory must be a directory: bookkeeping files beside it are not found.
        return open_beneath(job_fd, [task], _DIR_FLAGS)
    finally:
        os.close(job_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _pread(fd: int, want: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < want:
        data = os.pread(fd, want - got, offset + got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _scan(fd: int) -> tuple[list[str], list[tuple[str, os.stat_result]]]:
    """Directories and regular files in the directory `fd`, sorted; links and special files left out."""
    dirs: list[str] = []
    files: list[tuple[str, os.stat_result]] = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.name)
                elif e.is_file(follow_symlinks=False):
                    files.append(
                        (e.name, e.stat(follow_symlinks=False))
                    )  # fstatat(fd, name, AT_SYMLINK_NOFOLLOW)
            except OSError:
                continue  # removed while listed
    dirs.sort()
    files.sort()
    return dirs, files


def _join(*names: str) -> str:
    return "/".join(n for n in names if n)


def _list_levels(
    fd: int, level: int, prefix: str, recursive: bool, out: list[pm.FileEntry]
) -> None:
    """List the TVM root (level 0) or a level of `tasks/` above task directories: directories only
    (at level 0 only the served areas), descending into each task directory through its own fd."""
    names = [a for a in SERVED_AREAS if _is_dir_at(fd, a)] if level == 0 else _scan(fd)[0]
    for name in names:
        if len(out) >= MAX_ENTRIES:
            return
        out.append(pm.FileEntry(name=_join(prefix, name), is_directory=True))
    if not recursive:
        return
    for name in names:
        try:
            sub = open_beneath(fd, [name], _DIR_FLAGS)
        except OSError:
            continue  # removed, or swapped for a link, since it was listed
        try:
            if level == 0 and name != "tasks" or level == TASK_LEVEL - 1:
                _walk(sub, _join(prefix, name), True, out)
            else:
                _list_levels(sub, level + 1, _join(prefix, name), True, out)
        finally:
            os.close(sub)


def _is_dir_at(fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _walk(base: int, prefix: str, recursive: bool, out: list[pm.FileEntry]) -> None:
    """List beneath the directory fd `base`, depth first in name order. Each subdirectory is
    reopened beneath `base` (not from its parent's fd), so one extra fd is open at a time however
    deep the tree; one swapped for a link since it was listed is skipped."""
    stack: list[list[str]] = [[]]
    while stack:
        rel = stack.pop()
        if rel:
            try:
                fd = open_beneath(base, rel, _DIR_FLAGS)
            except OSError:
                continue
        else:
            fd = base
        try:
            dirs, files = _scan(fd)
        finally:
            if fd != base:
                os.close(fd)
        for d in dirs:
            if len(out) >= MAX_ENTRIES:
                return
            out.append(pm.FileEntry(name=_join(prefix, *rel, d), is_directory=True))
        for f, st in files:
            if len(out) >= MAX_ENTRIES:
                return
            out.append(
                pm.FileEntry(name=_join(prefix, *rel, f), size=st.st_size, mtime=st.st_mtime)
            )
        if not recursive:
            return
        stack.extend([*rel, d] for d in reversed(dirs))
