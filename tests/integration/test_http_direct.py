"""REST requests answered in hypercorn's reader task (coordinator/runtime/httpdirect.py), over raw
sockets to a real coordinator: requests split across segments and pipelined in one, HEAD, a body
over the direct limit, and everything the hook leaves to hypercorn (a malformed request line, a
chunked body, `Expect: 100-continue`, `Connection: close`, the dashboard, an upload) answered as
before, on the same connection where HTTP allows it."""

from __future__ import annotations

import json

import trio

from coordinator.common.sharedkey import sign_request
from coordinator.runtime import httpdirect
from tests.harness import cluster_ctx


class Raw:
    """One TCP connection to the coordinator, read answer by answer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"connection closed; got {self.buf!r}"
                self.buf += chunk
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if head_only:
                return status, headers, b""
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    while b"\r\n" not in self.buf:
                        self.buf += await self.stream.receive_some(65536)
                    size_line, _, self.buf = self.buf.partition(b"\r\n")
                    size = int(size_line, 16)
                    while len(self.buf) < size + 2:
                        self.buf += await self.stream.receive_some(65536)
                    body += self.buf[:size]
                    self.buf = self.buf[size + 2 :]
                    if size == 0:
                        return status, headers, body
            n = int(headers.get("content-length", "0"))
            while len(self.buf) < n:
                chunk = await self.stream.receive_some(65536)
                assert chunk
                self.buf += chunk
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body

    async def closed(self) -> bool:
        with trio.fail_after(10):
            return await self.stream.receive_some(1) == b""


def _request(c, method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:  # noqa: ANN001
    headers: dict[str, str] = {}
    if body or method in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "application/json"
    sign_request(method, path, "", headers, c.rc.account, c.rc.key)
    lines = [f"{method} {path} HTTP/1.1", "Host: coordinator"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + body


async def _connect(c) -> Raw:  # noqa: ANN001
    port = int(c.rc.endpoint.rsplit(":", 1)[1].rstrip("/"))
    return Raw(await trio.open_tcp_stream("127.0.0.1", port))


async def test_ordinary_requests_split_pipelined_and_head(nursery, tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_HTTP_DIRECT", raising=False)
    async with cluster_ctx(nursery, tmp_path) as c:
        before = httpdirect.answered
        raw = await _connect(c)
        add = json.dumps({"name": "p1", "vmSize": "small", "targetDedicated": 0}).encode()
        data = _request(c, "POST", "/pools", add)
        for i in range(0, len(data), 7):  # the request in 7-byte segments
            await raw.send(data[i : i + 7])
            await trio.sleep(0.002)  # each segment read on its own
        status, headers, _ = await raw.answer()
        assert status == 201, headers
        assert "date" in headers
        # three pipelined in one segment, answered in order on the same connection
        await raw.send(
            _request(c, "GET", "/pools/p1")
            + _request(c, "GET", "/pools/nope")
            + _request(c, "HEAD", "/pools/p1")
        )
        status, _, body = await raw.answer()
        assert (status, json.loads(body)["name"]) == (200, "p1")
        status, _, body = await raw.answer()
        assert (status, json.loads(body)["code"]) == (404, "PoolNotFound")
        status, headers, _ = await raw.answer(head_only=True)
        assert status == 405  # no HEAD on pools; its error's length is stated, its body not sent
        assert int(headers["content-length"]) > 0
        await raw.send(_request(c, "GET", "/pools/p1"))
        assert raw.buf == b""
        assert (await raw.answer())[0] == 200
        # an unsigned request is refused the same way
        await raw.send(b"GET /pools HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await raw.answer()
        assert status == 401 or status == 403, body
        await raw.stream.aclose()
        assert httpdirect.answered - before == 6  # every one of them answered by the hook


async def test_what_the_hook_leaves_to_hypercorn_is_answered_as_before(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        # a chunked body: hypercorn reads it; the pool is made
        raw = await _connect(c)
        add = json.dumps({"name": "p2", "vmSize": "small", "targetDedicated": 0}).encode()
        headers = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
        sign_request("POST", "/pools", "", headers, c.rc.account, c.rc.key)
        head = "POST /pools HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(add), add)
        await raw.send(head.encode() + b"\r\n" + chunked)
        assert (await raw.answer())[0] == 201
        await raw.send(_request(c, "GET", "/pools/p2"))  # and on the same connection after it
        assert (await raw.answer())[0] == 200
        await raw.stream.aclose()

        # Expect: 100-continue: hypercorn says continue, then answers
        raw = await _connect(c)
        add = json.dumps({"name": "p3", "vmSize": "small", "targetDedicated": 0}).encode()
        req = _request(c, "POST", "/pools", add, extra="Expect: 100-continue\r\n")
        await raw.send(req[: len(req) - len(add)])
        assert (await raw.answer(head_only=True))[0] == 100
        await raw.send(add)
        assert (await raw.answer())[0] == 201
        await raw.stream.aclose()

        # Connection: close: answered, then closed
        raw = await _connect(c)
        await raw.send(_request(c, "GET", "/pools/p3", extra="Connection: close\r\n"))
        assert (await raw.answer())[0] == 200
        assert await raw.closed()
        await raw.stream.aclose()

        # a malformed request line: hypercorn's 400
        raw = await _connect(c)
        await raw.send(b"GET /pools HTTP/1.1 extra\r\nHost: x\r\n\r\n")
        assert (await raw.answer())[0] == 400
        await raw.stream.aclose()

        # after a direct answer, an upload on the same connection (streamed by hypercorn's path)
        raw = await _connect(c)
        await raw.send(_request(c, "GET", "/pools/p3"))
        assert (await raw.answer())[0] == 200
        content = b"x" * 100_000
        await raw.send(_request(c, "POST", "/files", content))
        status, _, body = await raw.answer()
        assert status == 201, body
        assert json.loads(body)["size"] == len(content)
        await raw.stream.aclose()

        # a body over the direct limit (2 MiB of task collection: refused as too large, by either)
        raw = await _connect(c)
        big = json.dumps({"value": [{"name": "t", "commandLine": "x" * (2 << 20)}]}).encode()
        await raw.send(_request(c, "POST", "/workitems/w/jobs/j/addtaskcollection", big))
        status, _, body = await raw.answer()
        assert status in (400, 404, 413), body
        await raw.stream.aclose()

        # the dashboard's login page (its own session, not SharedKey)
        raw = await _connect(c)
        await raw.send(b"GET /ui/ HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await raw.answer()
        assert status in (200, 302, 303, 401), status
        await raw.stream.aclose()
