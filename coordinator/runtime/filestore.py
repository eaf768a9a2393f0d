"""Content-addressed file store (storage layer only; HTTP routes live elsewhere).

Layout: ``root/ab/cd/<sha256 hex>`` for stored blobs, ``root/.tmp/*.part`` for uploads in
progress. A blob only ever appears under its final name after its hash was verified and the data
fsynced, so a crash leaves at most a stray ``.part`` (cleaned when the store is opened).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

import trio

from coordinator.common.errors import quoted
from protocol.hostio import fsync_dir

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
_TMP = ".tmp"
# Left free on the store's file system for the journal beside it: a tenth, at most this much.
MAX_RESERVE = 256 * 1024 * 1024


class FileStoreError(Exception):
    """Error with a stable ``code``: FileNotFound, FileHashMismatch, InvalidHash, InvalidRange,
    FileTooLarge, FileDamaged (the shared store's copy does not match its hash)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    size: int
    created: datetime


def check_sha256(value: object) -> str:
    """Return `value` if it is 64 lowercase hex digits, else raise InvalidHash."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        shown = quoted(value, 77)
        raise FileStoreError(
            "InvalidHash", f"{shown} is not a sha256 digest (64 lowercase hex digits)"
        )
    return value


def parse_range_header(value: str | None, size: int) -> tuple[int, int] | None:
    """Parse an HTTP ``Range`` header against a resource of `size` bytes.

    Returns inclusive ``(start, end)`` clamped to the resource, or None when the header is absent
    (None or blank). Raises FileStoreError("InvalidRange") when the header is malformed, uses a
    unit other than bytes, asks for several ranges, or cannot be satisfied (416 territory).
    """
    if value is None or value.strip() == "":
        return None
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    shown = quoted(value, 80)
    if "," in value:
        raise FileStoreError("InvalidRange", f"multiple ranges are not supported: {shown}")
    m = _RANGE.fullmatch(value)
    if m is None:
        raise FileStoreError(
            "InvalidRange", f"malformed Range {shown}; expected bytes=START-END, START- or -N"
        )
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        raise FileStoreError("InvalidRange", f"malformed Range {shown}: no positions")
    if first == "":
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise FileStoreError("InvalidRange", f"range {shown} is unsatisfiable for {size} bytes")
        return max(0, size - suffix), size - 1
    start = _position(first)
    end = size - 1 if last == "" else _position(last)
    if last != "" and end < start:
        raise FileStoreError("InvalidRange", f"malformed Range {shown}: end before start")
    if start >= size:
        raise FileStoreError("InvalidRange", f"range {shown} starts beyond the end of {size} bytes")
    return start, min(end, size - 1)


def _position(digits: str) -> int:
    """A byte position of a Range header: past any file's size when it has more digits than a
    64-bit number (Python refuses to convert thousands of digits)."""
    return int(digits) if len(digits) <= 19 else 2**63


class Replica(Protocol):
    """Where blobs are kept for every coordinator sharing a store (`pgblobs.PgBlobs`); blocking."""

    def save(self, sha256: str, path: str) -> None: ...

    def fetch(self, sha256: str, write: Callable[[bytes], object]) -> bool: ...

    def list(self) -> list[tuple[str, int, datetime]]: ...


class FileStore:
    """Blobs on local disk addressed by their sha256; with a `replica`, also in the shared store
    (an upload is acknowledged once both hold it; a blob missing here is fetched from there)."""

    parse_range_header = staticmethod(parse_range_header)

    def __init__(self, root: str, replica: Replica | None = None) -> None:
        self.root = os.path.abspath(root)
        self.replica = replica
        self._tmp = os.path.join(self.root, _TMP)
        os.makedirs(self._tmp, exist_ok=True)
        # Leftovers of uploads interrupted by a crash: nothing refers to them.
        for name in os.listdir(self._tmp):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._tmp, name))

    def path_for(self, sha256: str) -> str:
        check_sha256(sha256)
        return os.path.join(self.root, sha256[:2], sha256[2:4], sha256)

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected_sha256: str | None = None,
        max_size: int | None = None,
    ) -> StoredFile:
        """Store the streamed content; idempotent for content already present.

        With `expected_sha256`, a mismatch raises FileHashMismatch and nothing is kept. With
        `max_size`, a longer stream raises FileTooLarge as soon as the limit is crossed.
        """
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0, not {max_size}")
        part = os.path.join(self._tmp, secrets.token_hex(16) + ".part")
        digest = hashlib.sha256()
        size = 0
        try:
            async with await trio.open_file(part, "xb") as f:
                async for chunk in chunks:
                    if not isinstance(chunk, bytes | bytearray | memoryview):
                        raise TypeError(f"put() chunks must be bytes, got {type(chunk).__name__}")
                    size += len(chunk)
                    if max_size is not None and size > max_size:
                        raise FileStoreError(
                            "FileTooLarge", f"upload exceeds the limit of {max_size} bytes"
                        )
                    self._check_room(len(chunk))
                    digest.update(chunk)
                    await f.write(chunk)
                await f.flush()
                await trio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise FileStoreError(
                    "FileHashMismatch",
                    f"declared sha256 {expected_sha256} but the {size} bytes received hash to "
                    f"{actual}; nothing was stored",
                )
            await trio.to_thread.run_sync(self._commit, part, actual)
            if self.replica is not None:
                await trio.to_thread.run_sync(self.replica.save, actual, self.path_for(actual))
            return self.stat(actual)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise

    def _check_room(self, n: int) -> None:
        """ENOSPC before `n` more bytes would eat into the reserve: uploads (a task's output
        files among them) must not fill the disk the coordinator's journal writes to."""
        st = os.statvfs(self._tmp)
        reserve = min(MAX_RESERVE, st.f_blocks * st.f_frsize // 10)
        if st.f_bavail * st.f_frsize - n < reserve:
            raise OSError(
                errno.ENOSPC,
                f"{reserve // 1024 // 1024} MiB of its disk are kept free for the coordinator's"
                " state",
            )

    def _commit(self, part: str, sha256: str) -> None:
        final = self.path_for(sha256)
        if os.path.exists(final):
            os.unlink(part)  # same content already stored; keep the original's timestamp
            return
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.chmod(part, 0o444)
        os.replace(part, final)
        fsync_dir(os.path.dirname(final))

    async def ensure_local(self, sha256: str) -> None:
        """Make a blob that another coordinator received (it is in the replica only) local."""
        if self.replica is not None:
            await trio.to_thread.run_sync(self._fetch, sha256)

    def _fetch(self, sha256: str) -> None:
        assert self.replica is not None
        if os.path.exists(self.path_for(sha256)):
            return
        part = os.path.join(self._tmp, secrets.token_hex(16) + ".part")
        digest = hashlib.sha256()
        try:
            with open(part, "xb") as f:

                def write(data: bytes) -> None:
                    digest.update(data)
                    f.write(data)

                if not self.replica.fetch(sha256, write):
                    return  # stat() says FileNotFound
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != sha256:
                raise FileStoreError(
                    "FileDamaged",
                    f"the shared store's copy of {sha256} hashes to {digest.hexdigest()}: it is"
                    " damaged and is not served",
                )
            self._commit(part, sha256)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)

    def stat(self, sha256: str) -> StoredFile:
        path = self.path_for(sha256)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileStoreError("FileNotFound", f"no stored file with sha256 {sha256}") from None
        return StoredFile(
            sha256=sha256, size=st.st_size, created=datetime.fromtimestamp(st.st_mtime, UTC)
        )

    def open_range(
        self, sha256: str, start: int = 0, end: int | None = None
    ) -> tuple[BinaryIO, int, int]:
        """Open a blob for reading bytes ``start..end`` (inclusive, like HTTP Range).

        Returns ``(file positioned at start, start, length)``; the caller closes the file and
        must read at most `length` bytes. `end` None means the last byte.
        """
        path = self.path_for(sha256)
        try:
            f = open(path, "rb")  # closed by the caller
        except FileNotFoundError:
            raise FileStoreError("FileNotFound", f"no stored file with sha256 {sha256}") from None
        try:
            size = os.fstat(f.fileno()).st_size
            _check_open_range(start, end, size)
            last = size - 1 if end is None else end
            f.seek(start)
            return f, start, last - start + 1
        except BaseException:
            f.close()
            raise

    def delete(self, sha256: str) -> None:
        path = self.path_for(sha256)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise FileStoreError("FileNotFound", f"no stored file with sha256 {sha256}") from None

    def list(self) -> list[StoredFile]:
        if self.replica is not None:  # every coordinator's uploads, not only this one's
            return [StoredFile(s, n, c) for s, n, c in self.replica.list()]
        found: list[StoredFile] = []
        for name in local_blobs(self.root):
            with contextlib.suppress(FileStoreError):  # deleted meanwhile
                found.append(self.stat(name))
        return found


def local_blobs(root: str) -> list[str]:
    """The sha256 of every blob stored under `root` (only read: `tvm store migrate` uses it)."""
    found: list[str] = []
    for top in sorted(os.listdir(root)):
        if len(top) != 2 or top == _TMP:
            continue
        top_dir = os.path.join(root, top)
        if not os.path.isdir(top_dir):
            continue
        for mid in sorted(os.listdir(top_dir)):
            mid_dir = os.path.join(top_dir, mid)
            if not os.path.isdir(mid_dir):
                continue
            for name in sorted(os.listdir(mid_dir)):
                if _HEX64.fullmatch(name) and name[:2] == top and name[2:4] == mid:
                    found.append(name)
    return found


def _check_open_range(start: int, end: int | None, size: int) -> None:
    shown = f"{start}-{'' if end is None else end}"
    if (
        isinstance(start, bool)
        or not isinstance(start, int)
        or (end is not None and (isinstance(end, bool) or not isinstance(end, int)))
    ):
        raise FileStoreError("InvalidRange", f"range {shown!r}: positions must be integers")
    if start < 0 or (end is not None and end < start):
        raise FileStoreError("InvalidRange", f"range {shown} is malformed")
    if size == 0 and start == 0 and end is None:
        return  # the whole of an empty file: zero bytes, still a valid read
    if start >= size or (end is not None and end >= size):
        raise FileStoreError("InvalidRange", f"range {shown} is outside the {size}-byte file")
