"""Resource-file downloads with a per-TVM content cache.

A download streams into ``<cache>/tmp/<random>.part`` while hashing, is checked against the
declared size/sha256, fsynced and renamed into the cache under its key; then it is hard-linked
(copied when linking is impossible or the file mode differs) into the task directory through a
temporary name and renamed into place. So a failure never leaves a partial file anywhere.

Cache keys: ``sha256/<hex>`` when the resource file declares its hash (content addressed, shared
by any URL), else ``url/<sha256 of the full URL, query included>``. Each entry has a ``.json``
sidecar recording size and mtime; because entries are hard-linked into task directories, a task
could modify one in place, and the sidecar lets us notice that and fetch again instead of handing
the altered bytes to the next task.

URLs are used exactly as given (SAS query strings included) but never appear with their query
string in errors: SAS tokens are secrets.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from protocol.hostio import fsync_dir
from protocol.paths import validate_relative_path

NOT_FOUND = "ResourceFileNotFound"
ACCESS_DENIED = "ResourceFileAccessDenied"
UNREACHABLE = "ResourceFileUnreachable"
HASH_MISMATCH = "ResourceFileHashMismatch"
SIZE_MISMATCH = "ResourceFileSizeMismatch"
DOWNLOAD_FAILED = "ResourceFileDownloadFailed"
INVALID_PATH = "ResourceFileInvalidPath"

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_BLOCK = 1 << 20


class DownloadError(Exception):
    """A resource file could not be provided; `code` is one of the module's code constants."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def redact_url(url: str) -> str:
    """The URL without query string, fragment or user:password (safe for logs and errors)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def cache_key(url: str, sha256: str | None) -> str:
    if sha256 is not None:
        return "sha256/" + sha256
    return "url/" + hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()


def status_error(status: int, shown_url: str) -> DownloadError:
    """Map a non-200 HTTP status to the error the task will report."""
    if status == 404:
        return DownloadError(NOT_FOUND, f"{shown_url} answered 404 Not Found")
    if status in (401, 403):
        return DownloadError(ACCESS_DENIED, f"{shown_url} answered {status}: access denied")
    return DownloadError(DOWNLOAD_FAILED, f"{shown_url} answered HTTP {status}")


def _check_url(url: str, shown: str) -> None:
    if not isinstance(url, str) or url == "":
        raise DownloadError(DOWNLOAD_FAILED, "resource file URL is empty")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise DownloadError(DOWNLOAD_FAILED, f"malformed URL {shown}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise DownloadError(
            DOWNLOAD_FAILED,
            f"unsupported URL scheme {parts.scheme!r} in {shown}; only http and https",
        )
    if not host:
        raise DownloadError(DOWNLOAD_FAILED, f"URL {shown} has no host")


def _check_args(sha256: str | None, size: int | None, mode: int) -> str | None:
    if sha256 is not None and (not isinstance(sha256, str) or not _HEX64.fullmatch(sha256)):
        raise DownloadError(DOWNLOAD_FAILED, f"declared sha256 {sha256!r} is not 64 hex digits")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise DownloadError(DOWNLOAD_FAILED, f"declared size {size!r} is not an integer >= 0")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise DownloadError(
            DOWNLOAD_FAILED, f"file mode {mode!r} is not a permission mode between 0 and 0o777"
        )
    return None if sha256 is None else sha256.lower()


def _scrub(text: str, url: str, shown: str) -> str:
    """Remove the URL's secret parts from an exception text before it reaches the user."""
    text = text.replace(url, shown)
    query = urlsplit(url).query if "?" in url else ""
    if query:
        text = text.replace(query, "<redacted>")
    return text


def _describe(exc: BaseException, url: str, shown: str) -> str:
    # httpx errors are often empty wrappers; the useful text (ECONNREFUSED, TLS verify failure)
    # sits on the chained exception.
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        if str(seen):
            return _scrub(str(seen), url, shown)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _within(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


class _EntryVanished(Exception):
    """The cache entry disappeared between lookup and linking (concurrent refetch/eviction)."""


@dataclass
class _Flight:
    """A download in progress that later callers for the same key wait on."""

    done: trio.Event
    url: str
    size: int | None
    error: DownloadError | None = None


class DownloadCache:
    """Per-TVM downloader: one fetch per cache key, bounded concurrency, atomic placement."""

    def __init__(
        self,
        cache_dir: str,
        *,
        max_concurrency: int = 4,
        http_timeout: float = 30.0,
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        """`verify` is passed to httpx2: True uses the OS trust store (truststore)."""
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError("max_concurrency must be an int")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        if not http_timeout > 0:
            raise ValueError(f"http_timeout must be > 0, not {http_timeout}")
        self.root = os.path.abspath(cache_dir)
        self._tmp = os.path.join(self.root, "tmp")
        # The cache holds every job's resource files: no task user may list or read it directly.
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in ("tmp", "sha256", "url"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        # A crash mid-download leaves .part files nobody will finish.
        for name in os.listdir(self._tmp):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._tmp, name))
        self._limiter = trio.CapacityLimiter(max_concurrency)
        # The HTTP client (and httpx2, ~2.4 MiB of imports) only once something is downloaded:
        # most agents' tasks have no resource files, and idle agent RSS counts (issue 10).
        self._client_args = (http_timeout, max_concurrency, verify)
        self._client_obj: Any = None
        self._inflight: dict[str, _Flight] = {}
        self._in_use: dict[str, int] = {}
        self._closed = False

    @property
    def _client(self) -> Any:  # httpx2.AsyncClient
        if self._client_obj is None:
            import httpx2

            http_timeout, max_concurrency, verify = self._client_args
            self._client_obj = httpx2.AsyncClient(
                timeout=httpx2.Timeout(http_timeout),
                limits=httpx2.Limits(
                    max_connections=max_concurrency, max_keepalive_connections=max_concurrency
                ),
                follow_redirects=True,
                verify=verify,
            )
        return self._client_obj

    def http_client(self) -> Any:
        """The shared httpx2.AsyncClient (output file uploads use it too)."""
        return self._client

    async def aclose(self) -> None:
        self._closed = True
        if self._client_obj is not None:
            await self._client_obj.aclose()

    async def fetch(
        self,
        url: str,
        dest_dir: str,
        file_path: str,
        *,
        sha256: str | None = None,
        size: int | None = None,
        headers: dict[str, str] | None = None,
        mode: int = 0o770,
    ) -> str:
        """Place the resource at ``dest_dir/file_path`` with `mode`; return its absolute path.

        Raises DownloadError (see the module constants for codes) and leaves no file behind.
        """
        if self._closed:
            raise RuntimeError("DownloadCache is closed")
        shown = redact_url(url) if isinstance(url, str) else "<invalid URL>"
        _check_url(url, shown)
        sha = _check_args(sha256, size, mode)
        dest_real, rel = self._prepare_dest(dest_dir, file_path)
        written = _abs_join(dest_dir, rel)
        key = cache_key(url, sha)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            for _attempt in range(3):
                cached = await self._ensure_cached(key, url, shown, sha, size, headers or {}, mode)
                try:
                    await self._place(cached, dest_real, rel, mode)
                    break
                except _EntryVanished:
                    continue  # replaced or evicted between caching and linking: once more
            else:
                raise DownloadError(
                    DOWNLOAD_FAILED, f"{shown}: cache entry kept disappearing while linking"
                )
        finally:
            self._in_use[key] -= 1
            if self._in_use[key] == 0:
                del self._in_use[key]
        return written

    # -- destination ---------------------------------------------------------------------------

    def _prepare_dest(self, dest_dir: str, file_path: str) -> tuple[str, str]:
        try:
            rel = validate_relative_path(file_path)
        except ValueError as exc:
            raise DownloadError(INVALID_PATH, f"resource file path rejected: {exc}") from None
        try:
            os.makedirs(dest_dir, exist_ok=True)
        except OSError as exc:
            raise DownloadError(
                DOWNLOAD_FAILED, f"cannot create directory {dest_dir}: {exc.strerror}"
            ) from None
        dest_real = os.path.realpath(dest_dir)
        # The string check cannot see symlinks already inside the directory.
        if not _within(os.path.realpath(os.path.join(dest_real, rel)), dest_real):
            raise DownloadError(
                INVALID_PATH, f"resource file path {rel!r} resolves outside the task directory"
            )
        return dest_real, rel

    async def _place(self, cached: str, dest_real: str, rel: str, mode: int) -> None:
        target, tmp = _make_parent(dest_real, rel)
        try:
            # Hard links share the inode, so its mode too: link only when the mode fits.
            if not _try_link(cached, tmp, mode):
                await trio.to_thread.run_sync(_copy_entry, cached, tmp, mode)
            os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise DownloadError(
                    DOWNLOAD_FAILED, f"cannot write resource file {rel!r}: {exc.strerror}"
                ) from None
            raise

    # -- cache ---------------------------------------------------------------------------------

    def _entry_path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def _valid_entry(self, path: str) -> os.stat_result | None:
        """The entry's stat if it exists and is unmodified since it was cached, else None."""
        try:
            with open(path + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        if st.st_size != meta.get("size") or st.st_mtime_ns != meta.get("mtime_ns"):
            return None
        return st

    def _discard_entry(self, path: str) -> None:
        for p in (path + ".json", path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    async def _ensure_cached(
        self,
        key: str,
        url: str,
        shown: str,
        sha: str | None,
        size: int | None,
        headers: dict[str, str],
        mode: int,
    ) -> str:
        path = self._entry_path(key)
        while True:
            flight = self._inflight.get(key)
            if flight is None:
                st = self._valid_entry(path)
                stale_url_entry = (
                    st is not None
                    and size is not None
                    and st.st_size != size
                    and key.startswith("url/")
                )
                if st is not None and not stale_url_entry:
                    if size is not None and st.st_size != size:
                        raise DownloadError(
                            SIZE_MISMATCH,
                            f"{shown}: declared size {size} but the file has {st.st_size} bytes",
                        )
                    # Record use for LRU eviction; keep mtime, which guards the entry.
                    with contextlib.suppress(OSError):
                        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
                    return path
                # Absent, unfinished, modified by a task, or a URL whose content changed size.
                self._discard_entry(path)
                break
            await flight.done.wait()
            # Same request failed: report that instead of hammering the server again. A
            # different request (other URL/size) or a cancelled leader: try ourselves.
            if flight.error is not None and flight.url == url and flight.size == size:
                raise DownloadError(flight.error.code, flight.error.message)
        flight = _Flight(trio.Event(), url, size)
        self._inflight[key] = flight
        try:
            await self._download(url, shown, path, sha, size, headers, mode)
        except DownloadError as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()
        return path

    async def _download(
        self,
        url: str,
        shown: str,
        path: str,
        sha: str | None,
        size: int | None,
        headers: dict[str, str],
        mode: int,
    ) -> None:
        part = os.path.join(self._tmp, secrets.token_hex(16) + ".part")
        try:
            async with self._limiter:
                digest, received = await self._stream(url, shown, part, size, headers)
            if size is not None and received != size:
                raise DownloadError(
                    SIZE_MISMATCH, f"{shown}: declared size {size} but received {received} bytes"
                )
            actual = digest.hexdigest()
            if sha is not None and actual != sha:
                raise DownloadError(
                    HASH_MISMATCH, f"{shown}: declared sha256 {sha} but the content has {actual}"
                )
            os.chmod(part, mode)
            await trio.to_thread.run_sync(self._commit, part, path)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            if isinstance(exc, OSError):
                raise DownloadError(DOWNLOAD_FAILED, _os_error_text(exc, shown)) from None
            raise

    def _commit(self, part: str, path: str) -> None:
        os.replace(part, path)
        st = os.stat(path)
        meta_tmp = part + ".json"
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump({"size": st.st_size, "mtime_ns": st.st_mtime_ns}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, path + ".json")
        fsync_dir(os.path.dirname(path))

    async def _stream(
        self, url: str, shown: str, part: str, size: int | None, headers: dict[str, str]
    ) -> tuple[hashlib._Hash, int]:
        digest = hashlib.sha256()
        received = 0
        # identity: the bytes must land exactly as stored, not transparently decompressed.
        request_headers = {"Accept-Encoding": "identity", **headers}
        client = self._client
        import httpx2  # already imported by `_client`

        try:
            async with client.stream("GET", url, headers=request_headers) as resp:
                if resp.status_code != 200:
                    raise status_error(resp.status_code, shown)
                announced = resp.headers.get("content-length", "")
                if size is not None and announced.isdigit() and int(announced) != size:
                    raise DownloadError(
                        SIZE_MISMATCH,
                        f"{shown}: declared size {size} but the server announces {announced}",
                    )
                async with await trio.open_file(part, "xb") as f:
                    async for block in resp.aiter_raw(_BLOCK):
                        received += len(block)
                        if size is not None and received > size:
                            raise DownloadError(
                                SIZE_MISMATCH,
                                f"{shown}: declared size {size} but the server sent more",
                            )
                        digest.update(block)
                        await f.write(block)
                    await f.flush()
                    await trio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
        except httpx2.TimeoutException:
            raise DownloadError(UNREACHABLE, f"{shown}: timed out") from None
        except httpx2.ConnectError as exc:
            raise DownloadError(
                UNREACHABLE, f"cannot connect to {shown}: {_describe(exc, url, shown)}"
            ) from None
        except httpx2.TooManyRedirects:
            raise DownloadError(DOWNLOAD_FAILED, f"{shown}: too many redirects") from None
        except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
            raise DownloadError(
                DOWNLOAD_FAILED, f"{shown}: transfer failed: {_describe(exc, url, shown)}"
            ) from None
        return digest, received

    # -- eviction ------------------------------------------------------------------------------

    async def prune(self, max_bytes: int) -> int:
        """Evict least-recently-used entries no task directory still links to, until the cache
        holds at most `max_bytes` (or only linked entries remain). Returns bytes freed."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, not {max_bytes!r}")
        entries = await trio.to_thread.run_sync(self._scan)
        total = sum(size for _, _, size, _ in entries)
        freed = 0
        for key, _atime, size, nlink in sorted(entries, key=lambda e: e[1]):
            if total <= max_bytes:
                break
            # Linked entries free nothing on disk; busy ones are about to be linked.
            if nlink > 1 or key in self._in_use or key in self._inflight:
                continue
            self._discard_entry(self._entry_path(key))
            total -= size
            freed += size
        return freed

    def _scan(self) -> list[tuple[str, int, int, int]]:
        out = []
        for ns in ("sha256", "url"):
            d = os.path.join(self.root, ns)
            for name in os.listdir(d):
                if name.endswith(".json"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(d, name))
                    out.append((f"{ns}/{name}", st.st_atime_ns, st.st_size, st.st_nlink))
        return out


def _abs_join(dest_dir: str, rel: str) -> str:
    return os.path.join(os.path.abspath(dest_dir), rel)


def _make_parent(dest_real: str, rel: str) -> tuple[str, str]:
    """Create the target's directory; return (target, temporary name beside it)."""
    target = os.path.join(dest_real, rel)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            DOWNLOAD_FAILED, f"cannot create directory for {rel!r}: {exc.strerror}"
        ) from None
    # Re-check after creating directories: a symlink swapped in meanwhile must not win.
    real_parent = os.path.realpath(parent)
    if real_parent != dest_real and not _within(real_parent, dest_real):
        raise DownloadError(
            INVALID_PATH, f"resource file path {rel!r} resolves outside the task directory"
        )
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    return target, tmp


def _try_link(cached: str, tmp: str, mode: int) -> bool:
    try:
        if os.stat(cached).st_mode & 0o777 != mode:
            return False
        os.link(cached, tmp)
    except FileNotFoundError:
        if not os.path.exists(cached):
            raise _EntryVanished from None
        raise
    except OSError:  # other filesystem, link limit, ...: the caller copies instead
        return False
    return True


def _copy_entry(cached: str, tmp: str, mode: int) -> None:
    try:
        shutil.copyfile(cached, tmp)
    except FileNotFoundError:
        if not os.path.exists(cached):
            raise _EntryVanished from None
        raise
    os.chmod(tmp, mode)


def _os_error_text(exc: OSError, shown: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{shown}: disk full while storing the download"
    return f"{shown}: cannot store the download: {exc.strerror or exc}"
