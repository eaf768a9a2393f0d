"""Output files: after a task's process ended, upload the files its `outputFiles` patterns match.

Matching follows Azure Batch: a pattern is relative to the task's working directory (`../` reaches
the task directory, where stdout.txt and stderr.txt are), `**` matches any number of directories,
`*` any characters of one name, `?` one character, `[abc]` one of a set. A pattern without a wildcard
names one file, uploaded under `path` itself; a wildcard pattern uploads every match under the
`path` prefix, named by its path below the pattern's literal directory part.

The agent runs as root but a task must not make it upload what the task could not read itself:
the walk goes through directory descriptors opened with O_NOFOLLOW (a symlink, to a file or to a
directory, is never followed), and a file is read only when the task's user could read it (its own,
or readable by its group or by anyone). A container destination is uploaded exactly as Azure Batch
does: `PUT {container path}/{blob}?{SAS query}` with `x-ms-blob-type: BlockBlob` and a
Content-Length (never chunked: Azure Storage refuses it); the coordinator's file store gets a POST
to `/files`. Transient failures are retried with backoff; the first file that cannot be uploaded
ends the uploads and becomes the task's failure (`FileUploadMiscError`, the file named), beside the
task's own exit code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import trio

from protocol import messages as pm

from .downloads import redact_url

log = logging.getLogger("tvm.agent")

UPLOAD_FAILED = "FileUploadMiscError"  # Azure's TaskFailureInformationCodes name
MAX_MATCHES = 10_000  # per pattern: a runaway `**` must not hold the agent
MAX_DEPTH = 100  # directory levels a pattern's walk descends
MAX_WALKED = 200_000  # directory entries a pattern's walk looks at
MAX_NAME = 1024  # characters of a blob name (Azure Storage's limit)
MAX_STORED = 10_000  # files one task puts in the coordinator's file store
_CHUNK = 1 << 20
_IN_MEMORY = 8 << 20  # smaller files are sent as one buffer
_RETRIES = 4  # attempts per file
_BACKOFF = 0.5  # seconds before the second attempt, doubled each time
_NO_MATCH = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
_WILD = re.compile(r"[*?\[]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UploadError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def wanted(condition: str, exit_code: int, failure: pm.Failure | None) -> bool:
    ok = exit_code == 0 and failure is None
    if condition == "tasksuccess":
        return ok
    if condition == "taskfailure":
        return not ok
    return True


def split_pattern(pattern: str) -> tuple[bool, list[str], list[str]]:
    """(from the task directory, literal directory parts, the rest). Raises ValueError for what
    the coordinator refuses at add time too (absolute, `..` other than one leading, empty)."""
    parts = pattern.replace("\\", "/").split("/")
    up = parts[0] == ".."
    absolute = parts[0] == ""
    parts = [p for p in parts[1 if up else 0 :] if p not in ("", ".")]
    if absolute or not parts or ".." in parts:
        raise ValueError(
            f"filePattern {pattern!r} must be a relative path (one leading ../ at most)"
        )
    i = 0
    while i < len(parts) - 1 and not _WILD.search(parts[i]):
        i += 1
    if not _WILD.search(parts[i]):
        i += 1  # no wildcard at all: the whole pattern is literal
    return up, parts[:i], parts[i:]


def _regex(parts: list[str]) -> re.Pattern[str]:
    out = []
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        seg = ""
        i = 0
        while i < len(part):
            c = part[i]
            if c == "*":
                seg += "[^/]*"
            elif c == "?":
                seg += "[^/]"
            elif c == "[":
                j = part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "]") else i + 1)
                if j < 0:
                    seg += re.escape(c)
                else:
                    body = part[i + 1 : j]
                    neg = body.startswith("!")
                    body = body[1:] if neg else body
                    seg += "[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]"
                    i = j
            else:
                seg += re.escape(c)
            i += 1
        out.append(seg + ("" if last else "/"))
    return re.compile("".join(out))


@dataclass
class Match:
    name: str  # below the pattern's literal directory (the blob name's tail)
    parts: list[str]  # its path from the base directory (the task directory for ../, else wd)
    up: bool


def _open_dir(parent: int, name: str) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _readable(st: os.stat_result, uid: int, gid: int) -> bool:
    """Whether the task's user could read this file itself (root, the elevated task, reads all)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def open_match(tdir: str, wd: str, mt: Match) -> tuple[int, int] | None:
    """(worker thread) (fd, size) of a matched file, opened through directory descriptors without
    following any symlink, if the task's user could read it; None otherwise (or if it is gone)."""
    # The task's user owns its working directory (root when elevated). The task owns the task
    # directory too, so it may have put a symlink (to a root-owned directory) in wd's place:
    # never followed here, else anything would count as readable.
    try:
        wfd = os.open(wd, _DIR_FLAGS)
    except OSError:
        return None
    try:
        owner = os.fstat(wfd)
    finally:
        os.close(wfd)
    fds: list[int] = []
    try:
        fds.append(os.open(tdir if mt.up else wd, _DIR_FLAGS))
        for part in mt.parts[:-1]:
            fds.append(_open_dir(fds[-1], part))
        fd = os.open(mt.parts[-1], _FILE_FLAGS, dir_fd=fds[-1])
    except OSError:  # a symlink (ELOOP, ENOTDIR), gone, or a FIFO without writer: not uploaded
        return None
    finally:
        for d in fds:
            os.close(d)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _readable(st, owner.st_uid, owner.st_gid):
        os.close(fd)
        return None
    return fd, st.st_size


def find(tdir: str, wd: str, pattern: str) -> list[Match]:
    """(worker thread) The regular files `pattern` matches (opened one at a time when uploaded:
    `open_match`, which checks again what was found here)."""
    up, literal, rest = split_pattern(pattern)
    fds: list[int] = []
    out: list[Match] = []
    try:
        fds.append(os.open(tdir if up else wd, _DIR_FLAGS))
        if not rest:  # one named file
            for part in literal[:-1]:
                fds.append(_open_dir(fds[-1], part))
            st = os.stat(literal[-1], dir_fd=fds[-1], follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append(Match(literal[-1], literal, up))
            return out
        for part in literal:
            fds.append(_open_dir(fds[-1], part))
        _walk(fds[-1], "", _regex(rest), literal, up, out)
        return out
    except OSError as exc:
        if exc.errno in _NO_MATCH:  # missing, or a symlink where a directory should be
            return out
        raise
    finally:
        for fd in fds:
            os.close(fd)


def _walk(
    dfd: int,
    prefix: str,
    rx: re.Pattern[str],
    literal: list[str],
    up: bool,
    out: list[Match],
    seen: list[int] | None = None,
    depth: int = 0,
) -> None:
    # The task shapes the tree: its depth (one open descriptor and one frame per level) and its
    # size (every entry held to sort a directory) are bounded, each with its own error.
    seen = [0] if seen is None else seen
    entries = []
    with os.scandir(dfd) as it:
        for e in it:
            seen[0] += 1
            if seen[0] > MAX_WALKED:
                raise UploadError(
                    _short(prefix + e.name),
                    f"the pattern's walk passes more than {MAX_WALKED} entries",
                )
            entries.append(e)
    entries.sort(key=lambda e: e.name)
    for e in entries:
        rel = prefix + e.name
        if e.is_dir(follow_symlinks=False):
            if depth >= MAX_DEPTH:
                raise UploadError(
                    _short(rel), f"directories nest more than {MAX_DEPTH} levels deep"
                )
            try:
                sub = _open_dir(dfd, e.name)
            except OSError:
                continue  # replaced by a symlink meanwhile, or unreadable: not followed
            try:
                _walk(sub, rel + "/", rx, literal, up, out, seen, depth + 1)
            finally:
                os.close(sub)
        elif e.is_file(follow_symlinks=False) and rx.fullmatch(rel):
            if len(out) >= MAX_MATCHES:
                raise UploadError(rel, f"the pattern matches more than {MAX_MATCHES} files")
            out.append(Match(rel, [*literal, *rel.split("/")], up))


def _short(rel: str) -> str:
    return rel if len(rel) <= 200 else rel[:100] + "..." + rel[-97:]


def blob_name(spec: pm.OutputFileSpec, m: Match, single: bool) -> str:
    if single:
        return spec.path or m.name
    return f"{spec.path.strip('/')}/{m.name}" if spec.path.strip("/") else m.name


def container_target(container_url: str, blob: str) -> str:
    """Azure Batch's form: the blob under the container URL's path, the SAS query kept."""
    u = urlsplit(container_url)
    path = u.path.rstrip("/") + "/" + quote(blob, safe="/")
    return urlunsplit((u.scheme, u.netloc, path, u.query, ""))


async def _body(fd: int, size: int) -> AsyncIterator[bytes]:
    offset = 0
    while offset < size:
        chunk = await trio.to_thread.run_sync(os.pread, fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            raise UploadError("", "the file shrank while it was uploaded")
        offset += len(chunk)
        yield chunk


class Uploader:
    """Uploads one finished task's output files (see the module's docstring)."""

    def __init__(
        self,
        client: Callable[[], Any],  # an httpx2.AsyncClient, made on first use
        http_base: Callable[[], str],
        http_headers: Callable[[], dict[str, str]],
        backoff: float = _BACKOFF,
    ) -> None:
        self._client = client
        self._http_base = http_base
        self._http_headers = http_headers
        self.backoff = backoff

    async def run(
        self,
        specs: list[pm.OutputFileSpec],
        tdir: str,
        wd: str,
        exit_code: int,
        failure: pm.Failure | None,
    ) -> tuple[pm.Failure | None, list[pm.OutputUploaded]]:
        """Upload what the conditions ask for: (the upload failure or None, file store uploads)."""
        stored: list[pm.OutputUploaded] = []
        for spec in specs:
            if not wanted(spec.condition, exit_code, failure):
                continue
            try:
                matches = await trio.to_thread.run_sync(find, tdir, wd, spec.pattern)
            except (OSError, ValueError, UploadError) as exc:
                return _failed(spec.pattern, str(exc)), stored
            single = not split_pattern(spec.pattern)[2]
            for mt in matches:
                name = blob_name(spec, mt, single)
                # Every file-store upload is named in the task's completion (one agent message,
                # one journal row): their number and names are bounded, as Azure bounds blob names.
                if len(name) > MAX_NAME:
                    return _failed(_short(name), f"its name is over {MAX_NAME} characters"), stored
                if not spec.container_url and len(stored) >= MAX_STORED:
                    return _failed(
                        _short(name), f"the task stores more than {MAX_STORED} files"
                    ), stored
                got = await trio.to_thread.run_sync(open_match, tdir, wd, mt)
                if got is None:
                    continue  # not the task's to read, a symlink, or gone
                fd, size = got
                try:
                    done = await self._one(spec, name, fd, size)
                except UploadError as exc:
                    return _failed(name, exc.message), stored
                finally:
                    os.close(fd)
                if done is not None:
                    stored.append(done)
        return None, stored

    async def _one(
        self, spec: pm.OutputFileSpec, name: str, fd: int, size: int
    ) -> pm.OutputUploaded | None:
        if spec.container_url:
            url = container_target(spec.container_url, name)
            headers = {
                "x-ms-blob-type": "BlockBlob",
                "x-ms-version": "2023-11-03",
                "Content-Type": "application/octet-stream",
            }
            method = "PUT"
        else:
            url = f"{self._http_base()}/files"
            headers = {"Content-Type": "application/octet-stream"}
            method = "POST"
        shown = redact_url(url)
        delay = self.backoff
        for attempt in range(_RETRIES):
            if not spec.container_url:
                headers.update(self._http_headers())  # a fresh proof per attempt
            # Content-Length set explicitly: with it, httpx never falls back to chunked encoding.
            headers["Content-Length"] = str(size)
            content: Any = (
                await trio.to_thread.run_sync(os.pread, fd, size, 0)
                if size <= _IN_MEMORY
                else _body(fd, size)
            )
            why = ""
            try:
                r = await self._client().request(method, url, content=content, headers=headers)
            except UploadError as exc:
                raise UploadError(name, exc.message) from None
            except Exception as exc:  # httpx transport errors: retried
                why = f"{shown}: {type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if r.status_code < 300:
                    if spec.container_url:
                        return None
                    return _stored(name, r.content)
                why = f"{shown} answered {r.status_code}"
                if r.status_code < 500 and r.status_code not in (408, 429):
                    raise UploadError(name, why)  # refused (SAS, permissions): no retry helps
            if attempt + 1 < _RETRIES:
                log.info("output file %s: %s; retrying in %.1fs", name, why, delay)
                await trio.sleep(delay)
                delay *= 2
        raise UploadError(name, f"{why} (after {_RETRIES} attempts)")


def _stored(name: str, body: bytes) -> pm.OutputUploaded:
    try:
        data = json.loads(body)
        return pm.OutputUploaded(name, str(data["sha256"]), int(data["size"]))
    except (ValueError, KeyError, TypeError):
        raise UploadError(name, "the file store's answer was not understood") from None


def _failed(name: str, message: str) -> pm.Failure:
    return pm.Failure(
        category="UserError",
        code=UPLOAD_FAILED,
        message=f"output file {name} was not uploaded: {message}",
    )
