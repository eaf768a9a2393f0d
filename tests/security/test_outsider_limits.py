"""What an outsider (no key, or a key and a hostile client) can make the coordinator do over HTTP and
the agent websocket: a real `tvm coordinator` process, real sockets, its memory read from /proc."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
from collections.abc import Iterator

import msgspec
import pytest
import trio
import trio_websocket

from coordinator.common.sharedkey import now_header, sign
from protocol import SUBPROTOCOL
from tests.harness import free_port, start_coordinator_process

ACCOUNT = "OutsiderAcct"  # mixed case: the Java SDK signs it lower-cased
UPLOAD_LIMIT = 1024 * 1024
GiB = 1024 * 1024 * 1024
MiB = 1024 * 1024


class Coord:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, key: str, state: str, log: str
    ) -> None:
        self.proc = proc
        self.port = port
        self.key = key
        self.state = state
        self.log = log

    def rss_kib(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def store_files(self) -> list[str]:
        """Every file under the file store, temporary ones included."""
        root = os.path.join(self.state, "files")
        return sorted(
            os.path.relpath(os.path.join(d, n), root)
            for d, _, names in os.walk(root)
            for n in names
        )


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coord]:
    base = tmp_path_factory.mktemp("outsider")
    state = str(base / "state")
    config = base / "coordinator.toml"
    config.write_text(f'account = "{ACCOUNT}"\nmax-upload-size = {UPLOAD_LIMIT}\n')
    log = str(base / "coordinator.log")
    port = free_port()
    proc, exports = start_coordinator_process(state, port, log, "--config", str(config))
    try:
        assert exports["TVM_ACCOUNT"] == ACCOUNT
        yield Coord(proc, port, exports["TVM_KEY"], state, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- raw HTTP


def _head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_SIGNED = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def _string_to_sign(
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    account: str,
    *,
    keep_case: bool,
    skip_blank: bool,
) -> str:
    """Written here from the Azure Batch scheme, as each SDK does it (not the coordinator's code)."""
    h = {k.lower(): v for k, v in headers.items()}
    text = method + "\n" + "".join(h.get(name, "") + "\n" for name in _SIGNED)
    text += "".join(f"{k}:{v.strip()}\n" for k, v in sorted(h.items()) if k.startswith("ocp-"))
    text += f"/{account}{path}"
    pairs = [tuple(p.split("=", 1)) for p in query.split("&") if p]
    for name, value in sorted(
        (n if keep_case else n.lower(), v) for n, v in pairs if v or not skip_blank
    ):
        text += f"\n{name}:{value}"
    return text


def _signed(
    coord: Coord,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    *,
    keep_case: bool = False,
    skip_blank: bool = False,
    lower_account: bool = False,
) -> dict[str, str]:
    headers = {**headers, "ocp-date": now_header()}
    account = ACCOUNT.lower() if lower_account else ACCOUNT
    text = _string_to_sign(
        method, path, query, headers, account, keep_case=keep_case, skip_blank=skip_blank
    )
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{sign(coord.key, text)}"
    return headers


def _parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", len(body)))
    return status, headers, body[:length]


def _exchange(
    coord: Coord, head: bytes, body: Iterator[bytes]
) -> tuple[int, dict[str, str], bytes, int]:
    """Send `head`, then the chunks of `body` for as long as the server takes them, reading as we
    go; return (status, headers, body, bytes of body sent). The body is produced lazily: a 1 GiB
    request never exists in this process's memory."""
    sent = 0
    received = b""
    with socket.create_connection(("127.0.0.1", coord.port), timeout=120) as sock:
        sock.sendall(head)
        sock.setblocking(False)  # send what fits, so an answer is read as soon as it comes
        pending = b""
        done_sending = False
        while True:
            if not pending and not done_sending:
                pending = next(body, b"")
                done_sending = not pending
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 120)
            if not readable and not writable:
                raise AssertionError("the coordinator neither answered nor read the body for 120 s")
            if readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received:
                    status, headers, rbody = _parse_response(received)
                    if len(rbody) >= int(headers.get("content-length", 0)):
                        return status, headers, rbody, sent
                continue
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                pending = b""
                done_sending = True
                continue
            sent += n
            pending = pending[n:]
    assert received, "the connection closed without an answer"
    status, headers, rbody = _parse_response(received)
    return status, headers, rbody, sent


def _zeros(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = bytes(chunk)
    left = total
    while left > 0:
        yield block[: min(chunk, left)]
        left -= chunk


def _chunked(inner: Iterator[bytes]) -> Iterator[bytes]:
    for piece in inner:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _code(body: bytes) -> str:
    return json.loads(body)["code"]


def _expect(status: int, body: bytes, want: int, code: str) -> None:
    assert status == want, body
    assert _code(body) == code, body


# --------------------------------------------------------------------------- tests


def test_unsigned_1gib_upload_is_refused_before_its_body_is_read(coord: Coord) -> None:
    rss_before = coord.rss_kib()
    peak_before = coord.rss_kib("VmHWM")
    head = _head(
        "POST", "/files", {"Content-Length": str(GiB), "Content-Type": "application/octet-stream"}
    )
    status, _, body, sent = _exchange(coord, head, _zeros(GiB))
    assert status in (401, 403), body
    assert _code(body) == "AuthenticationFailed"
    # Memory bound, not timing: buffering the body cost 1-2 GiB before the fix.
    grown = coord.rss_kib() - rss_before
    peak_grown = coord.rss_kib("VmHWM") - peak_before
    assert grown < 100 * 1024, (grown, sent)
    assert peak_grown < 100 * 1024, (peak_grown, sent)
    assert sent < GiB // 2, f"the coordinator read {sent} bytes of an unsigned body"
    assert [f for f in coord.store_files() if f.startswith(".tmp/")] == []


def test_badly_signed_upload_is_refused_without_reading_the_body(coord: Coord) -> None:
    headers = _signed(coord, "POST", "/files", "", {"Content-Length": str(GiB)})
    headers["Authorization"] = headers["Authorization"][:-8] + "AAAAAAA="
    peak_before = coord.rss_kib("VmHWM")
    status, _, body, sent = _exchange(coord, _head("POST", "/files", headers), _zeros(GiB))
    _expect(status, body, 403, "AuthenticationFailed")
    assert coord.rss_kib("VmHWM") - peak_before < 100 * 1024
    assert sent < GiB // 2


def test_signed_upload_over_the_limit_declared_length(coord: Coord) -> None:
    size = 3 * UPLOAD_LIMIT
    headers = _signed(coord, "POST", "/files", "", {"Content-Length": str(size)})
    status, _, body, _ = _exchange(coord, _head("POST", "/files", headers), _zeros(size, 64 * 1024))
    _expect(status, body, 413, "RequestBodyTooLarge")
    assert str(UPLOAD_LIMIT) in json.loads(body)["message"]["value"]
    assert coord.store_files() == []


def test_signed_chunked_upload_over_the_limit_leaves_nothing(coord: Coord) -> None:
    # No Content-Length: the limit is found while streaming; the partial file must go.
    headers = _signed(coord, "POST", "/files", "", {"Transfer-Encoding": "chunked"})
    status, _, body, sent = _exchange(
        coord, _head("POST", "/files", headers), _chunked(_zeros(8 * UPLOAD_LIMIT, 64 * 1024))
    )
    _expect(status, body, 413, "RequestBodyTooLarge")
    assert sent > UPLOAD_LIMIT  # it really was streamed up to the limit, not refused by header
    assert coord.store_files() == []


def test_upload_within_the_limit_is_stored_and_md5_checked(coord: Coord) -> None:
    data = os.urandom(UPLOAD_LIMIT // 2)
    good = base64.b64encode(hashlib.md5(data).digest()).decode()
    bad = base64.b64encode(hashlib.md5(data + b"x").digest()).decode()
    headers = _signed(
        coord, "POST", "/files", "", {"Content-Length": str(len(data)), "Content-MD5": bad}
    )
    status, _, body, _ = _exchange(coord, _head("POST", "/files", headers), iter([data]))
    _expect(status, body, 400, "Md5Mismatch")
    assert coord.store_files() == []
    headers = _signed(
        coord, "POST", "/files", "", {"Content-Length": str(len(data)), "Content-MD5": good}
    )
    status, _, body, _ = _exchange(coord, _head("POST", "/files", headers), iter([data]))
    assert status == 201, body
    sha = hashlib.sha256(data).hexdigest()
    assert json.loads(body)["sha256"] == sha
    assert [f for f in coord.store_files() if not f.startswith(".tmp/")] == [
        f"{sha[:2]}/{sha[2:4]}/{sha}"
    ]


def _post_json(
    coord: Coord, path: str, body: bytes, extra: dict[str, str] | None = None
) -> tuple[int, bytes]:
    headers = {
        "Content-Type": "application/json; odata=minimalmetadata",
        "Content-Length": str(len(body)),
        **(extra or {}),
    }
    status, _, rbody, _ = _exchange(
        coord, _head("POST", path, _signed(coord, "POST", path, "", headers)), iter([body])
    )
    return status, rbody


def _get(coord: Coord, path: str, query: str, **how: bool) -> tuple[int, bytes]:
    headers = _signed(coord, "GET", path, query, {}, **how)
    status, _, body, _ = _exchange(coord, _head("GET", f"{path}?{query}", headers), iter([]))
    return status, body


def test_json_body_with_a_wrong_content_md5_is_refused_and_nothing_is_created(coord: Coord) -> None:
    name = f"md5pool{os.getpid()}"
    body = json.dumps({"name": name, "targetDedicated": 0}).encode()
    wrong = base64.b64encode(hashlib.md5(body + b" ").digest()).decode()
    status, rbody = _post_json(coord, "/pools", body, {"Content-MD5": wrong})
    _expect(status, rbody, 400, "Md5Mismatch")
    assert _get(coord, f"/pools/{name}", "")[0] == 404
    status, rbody = _post_json(coord, "/pools", body, {"Content-MD5": "not base64!"})
    _expect(status, rbody, 400, "InvalidHeaderValue")
    right = base64.b64encode(hashlib.md5(body).digest()).decode()
    status, rbody = _post_json(coord, "/pools", body, {"Content-MD5": right})
    assert status == 201, rbody


def test_oversized_json_body_is_refused(coord: Coord) -> None:
    body = json.dumps(
        {"name": "big", "metadata": [{"name": "k", "value": "v" * (5 * MiB)}]}
    ).encode()
    status, rbody = _post_json(coord, "/pools", body)
    _expect(status, rbody, 413, "RequestBodyTooLarge")


def test_deeply_nested_json_is_a_400(coord: Coord) -> None:
    for body in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"name": "p", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"value": [' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"]}",
    ):
        status, rbody = _post_json(coord, "/pools", body)
        _expect(status, rbody, 400, "InvalidRequestBody")
        status, rbody = _post_json(coord, "/workitems/w/jobs/j/addtaskcollection", body)
        assert status in (400, 404), rbody
    assert coord.proc.poll() is None


def test_query_names_signed_with_their_case_or_lower_cased_are_accepted(coord: Coord) -> None:
    query = "timeOut=30&api-version=2024-07-01.20.0&empty="
    # Python Azure SDKs: names as sent, empty values left out.
    assert _get(coord, "/pools", query, keep_case=True, skip_blank=True)[0] == 200
    assert _get(coord, "/pools", "timeOut=30", keep_case=True)[0] == 200
    # Java SDK: names and account lower-cased.
    assert _get(coord, "/pools", query, lower_account=True)[0] == 200
    # Our own client (names lower-cased, account as is).
    assert _get(coord, "/pools", query)[0] == 200
    # A signature over other parameters is still refused.
    headers = _signed(coord, "GET", "/pools", "timeOut=30", {}, keep_case=True)
    status, _, body, _ = _exchange(coord, _head("GET", "/pools?timeOut=31", headers), iter([]))
    _expect(status, body, 403, "AuthenticationFailed")


# --------------------------------------------------------------------------- agent websocket


async def test_large_message_before_authentication_closes_the_agent_link(coord: Coord) -> None:
    peak_before = coord.rss_kib("VmHWM")
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{coord.port}/agent", subprotocols=[SUBPROTOCOL], message_queue_size=1
    ) as ws:
        await ws.send_message(bytes(2 * MiB))
        with trio.fail_after(30), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    assert reason.code == 1009, reason
    assert "before authentication" in (reason.reason or ""), reason
    assert coord.rss_kib("VmHWM") - peak_before < 100 * 1024


async def test_small_bad_hello_still_gets_the_protocol_answer(coord: Coord) -> None:
    # Under the pre-auth limit the endpoint decides as before (a malformed hello: 4002).
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{coord.port}/agent", subprotocols=[SUBPROTOCOL]
    ) as ws:
        await ws.send_message(b"\x00" * 1024)
        with trio.fail_after(30), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await _drain(ws)
    assert closed.value.reason.code == 4002, closed.value.reason


async def _drain(ws: trio_websocket.WebSocketConnection) -> None:
    while True:  # the Reject message comes first, then the close
        await ws.get_message()


async def test_deeply_nested_hello_is_a_protocol_error_not_an_internal_error(coord: Coord) -> None:
    # Under the pre-auth size limit but 60,000 levels deep in a field the decoder skips.
    hello = msgspec.msgpack.encode({"t": "hello", "agent_id": "nested", "zz": 0})
    hello = hello.replace(msgspec.msgpack.encode(0), b"\x91" * 60_000 + b"\x00", 1)
    async with trio_websocket.open_websocket_url(
        f"ws://127.0.0.1:{coord.port}/agent", subprotocols=[SUBPROTOCOL]
    ) as ws:
        await ws.send_message(hello)
        with trio.fail_after(30), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await _drain(ws)
    assert closed.value.reason.code == 4002, closed.value.reason
    assert "nested too deeply" in (closed.value.reason.reason or "")
