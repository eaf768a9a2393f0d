"""DownloadCache against a real HTTP server on 127.0.0.1 (http.server in a thread)."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import ssl
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tvmagent.downloads import DownloadCache, DownloadError

BIG = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB blocks plus a tail
SMALL = b"hello resource file\n"
GZ = gzip.compress(b"compressed payload " * 100)
SAS = "sv=2015-04-05&sr=b&sig=SeCrEt%2Babc%3D&se=2026-01-01T00%3A00%3A00Z"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"/big.bin": BIG, "/small.txt": SMALL}
        self.paths: list[str] = []  # raw request targets, query included
        self.counts: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.gate: threading.Event | None = None  # when set, /file responses wait for it
        self.on_request: Callable[[], None] | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.paths.append(self.path)
                    server.counts[path] += 1
                    server.headers.append(dict(self.headers))
                if server.on_request is not None:
                    server.on_request()
                if server.gate is not None and path in server.files:
                    server.gate.wait(10)
                if path.startswith("/status/"):
                    self.send_response(int(path.rsplit("/", 1)[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/small.txt")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/truncated":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    self.close_connection = True
                elif path == "/archive.gz":
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(GZ)))
                    self.end_headers()
                    self.wfile.write(GZ)
                elif path in server.files:
                    body = server.files[path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    yield s
    if s.gate is not None:
        s.gate.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
async def cache(tmp_path: Path):
    c = DownloadCache(str(tmp_path / "cache"), max_concurrency=4, http_timeout=10)
    yield c
    await c.aclose()


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def cache_parts(tmp_path: Path) -> list[Path]:
    return all_files(tmp_path / "cache" / "tmp")


async def test_byte_exact_with_mode_and_sas_query(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    task = tmp_path / "task1" / "wd"
    url = server.url("/big.bin?" + SAS)
    written = await cache.fetch(url, str(task), "inputs/data/big.bin", sha256=sha(BIG))
    assert written == str(task / "inputs" / "data" / "big.bin")
    assert read(written) == BIG
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o770
    assert server.paths == ["/big.bin?" + SAS]  # query string reached the server untouched
    assert server.headers[0].get("Accept-Encoding") == "identity"
    assert cache_parts(tmp_path) == []


async def test_custom_mode_and_headers(server: Server, cache: DownloadCache, tmp_path: Path):
    written = await cache.fetch(
        server.url("/small.txt"),
        str(tmp_path / "wd"),
        "s.txt",
        mode=0o640,
        headers={"Authorization": "Bearer abc"},
    )
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o640
    assert read(written) == SMALL
    assert server.headers[0]["Authorization"] == "Bearer abc"


async def test_second_fetch_comes_from_cache(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    url = server.url("/small.txt?" + SAS)
    a = await cache.fetch(url, str(tmp_path / "t1"), "f.txt")
    b = await cache.fetch(url, str(tmp_path / "t2"), "sub/f.txt")
    c = await cache.fetch(url, str(tmp_path / "t3"), "f.txt", mode=0o600)
    assert server.counts["/small.txt"] == 1
    for p in (a, b, c):
        assert read(p) == SMALL
    # same mode: hard link into the cache; other mode: an independent copy
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(c).st_ino != os.stat(a).st_ino
    assert stat.S_IMODE(os.stat(c).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o770


async def test_same_hash_from_other_url_is_served_from_cache(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    server.files["/copy.txt"] = SMALL
    await cache.fetch(server.url("/small.txt"), str(tmp_path / "t1"), "f", sha256=sha(SMALL))
    p = await cache.fetch(server.url("/copy.txt"), str(tmp_path / "t2"), "f", sha256=sha(SMALL))
    assert read(p) == SMALL
    assert server.counts["/copy.txt"] == 0


async def test_cache_survives_restart(server: Server, tmp_path: Path) -> None:
    url = server.url("/small.txt")
    c1 = DownloadCache(str(tmp_path / "cache"))
    await c1.fetch(url, str(tmp_path / "t1"), "f")
    await c1.aclose()
    (tmp_path / "cache" / "tmp" / "stale.part").write_bytes(b"left by a crash")
    c2 = DownloadCache(str(tmp_path / "cache"))
    try:
        assert cache_parts(tmp_path) == []
        p = await c2.fetch(url, str(tmp_path / "t2"), "f")
    finally:
        await c2.aclose()
    assert read(p) == SMALL
    assert server.counts["/small.txt"] == 1


async def test_entry_modified_by_a_task_is_fetched_again(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    url = server.url("/small.txt")
    a = await cache.fetch(url, str(tmp_path / "t1"), "f")
    append(a, b"tampered")  # a task appends to its (hard-linked) resource file
    b = await cache.fetch(url, str(tmp_path / "t2"), "f")
    assert read(b) == SMALL
    assert server.counts["/small.txt"] == 2


async def test_concurrent_fetches_coalesce(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    server.gate = threading.Event()
    arrived = trio.Event()
    token = trio.lowlevel.current_trio_token()
    server.on_request = lambda: trio.from_thread.run_sync(arrived.set, trio_token=token)
    url = server.url("/big.bin?" + SAS)
    results: list[str] = []

    async def one(i: int) -> None:
        results.append(await cache.fetch(url, str(tmp_path / f"t{i}"), "big.bin"))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
        await arrived.wait()
        # Every fetch has started and is parked (waiting on the leader or on the server).
        await trio.testing.wait_all_tasks_blocked()
        server.gate.set()
    assert len(results) == 6
    assert server.counts["/big.bin"] == 1
    for p in results:
        assert read(p) == BIG


async def test_concurrent_failure_is_shared(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    url = server.url("/status/403?" + SAS)
    codes: list[str] = []

    async def one(i: int) -> None:
        try:
            await cache.fetch(url, str(tmp_path / f"t{i}"), "x")
        except DownloadError as exc:
            codes.append(exc.code)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert codes == ["ResourceFileAccessDenied"] * 4
    assert server.counts["/status/403"] == 1  # the followers got the leader's answer


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/missing.bin", "ResourceFileNotFound"),
        ("/status/403", "ResourceFileAccessDenied"),
        ("/status/401", "ResourceFileAccessDenied"),
        ("/status/500", "ResourceFileDownloadFailed"),
        ("/status/204", "ResourceFileDownloadFailed"),
        ("/truncated", "ResourceFileDownloadFailed"),
    ],
)
async def test_http_errors(
    server: Server, cache: DownloadCache, tmp_path: Path, path: str, code: str
) -> None:
    url = server.url(path + "?" + SAS)
    with pytest.raises(DownloadError) as info:
        await cache.fetch(url, str(tmp_path / "wd"), "out.bin")
    assert info.value.code == code
    assert server.url(path) in info.value.message
    assert "SeCrEt" not in str(info.value)
    assert "sig=" not in str(info.value)
    assert all_files(tmp_path / "wd") == []
    assert cache_parts(tmp_path) == []


async def test_closed_port_is_unreachable(cache: DownloadCache, tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/file.bin?{SAS}"
    with pytest.raises(DownloadError) as info:
        await cache.fetch(url, str(tmp_path / "wd"), "f")
    assert info.value.code == "ResourceFileUnreachable"
    assert f"http://127.0.0.1:{port}/file.bin" in info.value.message
    assert "SeCrEt" not in str(info.value)
    assert all_files(tmp_path / "wd") == []


async def test_silent_server_times_out_as_unreachable(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # accepts connections in the kernel, never answers
    cache = DownloadCache(str(tmp_path / "cache"), http_timeout=0.3)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        with pytest.raises(DownloadError) as info:
            await cache.fetch(url, str(tmp_path / "wd"), "f")
    finally:
        await cache.aclose()
        listener.close()
    assert info.value.code == "ResourceFileUnreachable"
    assert "timed out" in info.value.message


async def test_unknown_host_is_unreachable(cache: DownloadCache, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        await cache.fetch("http://no-such-host.invalid/x", str(tmp_path / "wd"), "f")
    assert info.value.code == "ResourceFileUnreachable"


async def test_hash_mismatch_leaves_nothing(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    wrong = sha(b"something else")
    with pytest.raises(DownloadError) as info:
        await cache.fetch(server.url("/big.bin"), str(tmp_path / "wd"), "big.bin", sha256=wrong)
    assert info.value.code == "ResourceFileHashMismatch"
    assert wrong in info.value.message
    assert sha(BIG) in info.value.message
    assert all_files(tmp_path / "wd") == []
    assert all_files(tmp_path / "cache") == []
    # the right hash afterwards works
    p = await cache.fetch(server.url("/big.bin"), str(tmp_path / "wd"), "big.bin", sha256=sha(BIG))
    assert read(p) == BIG


@pytest.mark.parametrize("declared", [len(SMALL) - 1, len(SMALL) + 1, 0])
async def test_size_mismatch_leaves_nothing(
    server: Server, cache: DownloadCache, tmp_path: Path, declared: int
) -> None:
    with pytest.raises(DownloadError) as info:
        await cache.fetch(server.url("/small.txt"), str(tmp_path / "wd"), "f", size=declared)
    assert info.value.code == "ResourceFileSizeMismatch"
    assert str(declared) in info.value.message
    assert all_files(tmp_path / "wd") == []
    assert all_files(tmp_path / "cache") == []


async def test_size_mismatch_against_cached_hash(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    url = server.url("/small.txt")
    await cache.fetch(url, str(tmp_path / "t1"), "f", sha256=sha(SMALL), size=len(SMALL))
    with pytest.raises(DownloadError) as info:
        await cache.fetch(url, str(tmp_path / "t2"), "f", sha256=sha(SMALL), size=3)
    assert info.value.code == "ResourceFileSizeMismatch"
    assert all_files(tmp_path / "t2") == []


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/evil", "a/../../x", "", "a\x00b"])
async def test_escaping_paths_rejected(
    server: Server, cache: DownloadCache, tmp_path: Path, bad: str
) -> None:
    wd = tmp_path / "jobs" / "wd"
    with pytest.raises(DownloadError) as info:
        await cache.fetch(server.url("/small.txt"), str(wd), bad)
    assert info.value.code == "ResourceFileInvalidPath"
    assert server.counts["/small.txt"] == 0  # rejected before any network traffic
    assert all_files(tmp_path) == []


async def test_symlink_escape_rejected(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    outside = tmp_path / "outside"
    wd.mkdir()
    outside.mkdir()
    (wd / "link").symlink_to(outside)
    (wd / "filelink").symlink_to(outside / "target.txt")
    for rel in ("link/f.txt", "link/deeper/f.txt", "filelink"):
        with pytest.raises(DownloadError) as info:
            await cache.fetch(server.url("/small.txt"), str(wd), rel)
        assert info.value.code == "ResourceFileInvalidPath"
    assert list(outside.iterdir()) == []


async def test_existing_file_is_replaced_and_directory_conflict_fails(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "f").write_bytes(b"old")
    p = await cache.fetch(server.url("/small.txt"), str(wd), "f")
    assert read(p) == SMALL
    (wd / "adir").mkdir()
    with pytest.raises(DownloadError) as info:
        await cache.fetch(server.url("/small.txt"), str(wd), "adir")
    assert info.value.code == "ResourceFileDownloadFailed"
    assert sorted(x.name for x in wd.iterdir()) == ["adir", "f"]  # no temporary left


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http:///nohost", "no host"),
        ("http://host:99999/x", "malformed"),
        ("", "empty"),
    ],
)
async def test_bad_urls(cache: DownloadCache, tmp_path: Path, url: str, fragment: str) -> None:
    with pytest.raises(DownloadError) as info:
        await cache.fetch(url, str(tmp_path / "wd"), "f")
    assert info.value.code == "ResourceFileDownloadFailed"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sha256": "abc"}, "64 hex digits"),
        ({"size": -1}, "declared size"),
        ({"mode": 0o4777}, "file mode"),
        ({"mode": -1}, "file mode"),
    ],
)
async def test_bad_arguments(
    server: Server, cache: DownloadCache, tmp_path: Path, kwargs: dict, fragment: str
) -> None:
    with pytest.raises(DownloadError) as info:
        await cache.fetch(server.url("/small.txt"), str(tmp_path / "wd"), "f", **kwargs)
    assert fragment in info.value.message
    assert server.counts["/small.txt"] == 0


async def test_redirect_followed(server: Server, cache: DownloadCache, tmp_path: Path) -> None:
    p = await cache.fetch(server.url("/redirect"), str(tmp_path / "wd"), "f")
    assert read(p) == SMALL


async def test_content_encoding_kept_raw(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    p = await cache.fetch(server.url("/archive.gz"), str(tmp_path / "wd"), "a.gz", sha256=sha(GZ))
    assert read(p) == GZ


async def test_prune_evicts_only_unreferenced(
    server: Server, cache: DownloadCache, tmp_path: Path
) -> None:
    a = await cache.fetch(server.url("/small.txt"), str(tmp_path / "t1"), "f")
    await cache.fetch(server.url("/big.bin"), str(tmp_path / "t2"), "f")
    assert await cache.prune(0) == 0  # both still linked from task directories
    os.unlink(a)  # task 1's directory is cleaned up
    assert await cache.prune(0) == len(SMALL)
    await cache.fetch(server.url("/small.txt"), str(tmp_path / "t3"), "f")
    await cache.fetch(server.url("/big.bin"), str(tmp_path / "t4"), "f")
    assert server.counts["/small.txt"] == 2
    assert server.counts["/big.bin"] == 1
    with pytest.raises(ValueError, match="max_bytes"):
        await cache.prune(-1)


async def test_closed_cache_refuses(tmp_path: Path) -> None:
    c = DownloadCache(str(tmp_path / "cache"))
    await c.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await c.fetch("http://127.0.0.1:1/x", str(tmp_path / "wd"), "f")


def test_constructor_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        DownloadCache(str(tmp_path), max_concurrency=0)
    with pytest.raises(ValueError, match="http_timeout"):
        DownloadCache(str(tmp_path), http_timeout=0)


async def test_https_with_custom_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    tls = Server()
    tls.httpd.socket = server_ctx.wrap_socket(tls.httpd.socket, server_side=True)
    tls.thread.start()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    good = DownloadCache(str(tmp_path / "c1"), verify=client_ctx)
    untrusting = DownloadCache(str(tmp_path / "c2"))  # OS trust store: does not know our CA
    try:
        url = tls.url("/small.txt?" + SAS).replace("http://", "https://")
        p = await good.fetch(url, str(tmp_path / "wd"), "f", sha256=sha(SMALL))
        assert read(p) == SMALL
        assert tls.paths == ["/small.txt?" + SAS]
        with pytest.raises(DownloadError) as info:
            await untrusting.fetch(url, str(tmp_path / "wd2"), "f")
        assert info.value.code == "ResourceFileUnreachable"
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
        assert "SeCrEt" not in str(info.value)
        assert all_files(tmp_path / "wd2") == []
    finally:
        await good.aclose()
        await untrusting.aclose()
        tls.httpd.shutdown()
        tls.httpd.server_close()


def test_cache_is_private_to_the_agent_even_when_it_was_left_open(tmp_path: Path) -> None:
    # Every job's resource files pass through the cache: a task user must not list or read it.
    (tmp_path / "cache" / "sha256").mkdir(parents=True)
    os.chmod(tmp_path / "cache", 0o755)
    DownloadCache(str(tmp_path / "cache"))
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "cache" / "url").st_mode) == 0o700
