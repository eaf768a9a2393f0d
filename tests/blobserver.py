"""A loopback HTTP server that takes blob uploads the way Azure Storage does, for output file tests.

`PUT /<container>/<blob>?<query>` with `x-ms-blob-type: BlockBlob` and a Content-Length is stored
(201); a chunked body (`Transfer-Encoding: chunked`, no length) is refused with 411, as Azure
Storage refuses it; a PUT without the blob type gets 400. `fail_first[path] = n` answers 500 to the
first n PUTs of a path; a container named `denied` answers 403 (a SAS without write permission).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class BlobStore:
    blobs: dict[str, bytes] = field(default_factory=dict)  # "/container/blob" -> bytes
    queries: dict[str, str] = field(default_factory=dict)  # path -> the query it came with
    refused: list[tuple[str, int]] = field(default_factory=list)  # (path, status)
    fail_first: dict[str, int] = field(default_factory=dict)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, container: str, sas: str = "sv=2023-11-03&sp=cw&sig=test%2Bsig") -> str:
        return f"http://127.0.0.1:{self.port}/{container}?{sas}"


def _handler(store: BlobStore) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, path: str = "") -> None:
            if status >= 300:
                with store.lock:
                    store.refused.append((path, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _drain_chunked(self) -> None:
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                self.rfile.read(size + 2)  # the chunk and its CRLF
                if size == 0:
                    return

        def do_PUT(self) -> None:  # noqa: N802
            u = urlsplit(self.path)
            path = unquote(u.path)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self._drain_chunked()  # read it all, so the client sees the answer
                self._answer(411, path)
                return
            if self.headers.get("Content-Length") is None:
                self.close_connection = True
                self._answer(411, path)
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("x-ms-blob-type") != "BlockBlob":
                self._answer(400, path)
                return
            if path.startswith("/denied/"):
                self._answer(403, path)
                return
            with store.lock:
                left = store.fail_first.get(path, 0)
                if left:
                    store.fail_first[path] = left - 1
            if left:
                self._answer(500, path)
                return
            with store.lock:
                store.blobs[path] = body
                store.queries[path] = u.query
            self._answer(201)

    return H


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hung up mid-request (a killed agent, a retry) is not the test's error;
        # socketserver's default prints a line and a traceback into the test run's output.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def blob_server() -> Iterator[BlobStore]:
    store = BlobStore()
    srv = _Server(("127.0.0.1", 0), _handler(store))
    store.port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield store
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()
