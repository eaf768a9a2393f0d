"""A request answered before its body ended (an upload refused by the file store's reserve, a
failed signature, a declared size over the limit) closes its connection: the coordinator stops
reading that body, so the client's next request on the same connection waited forever (a client
that had just been told 503 StoreUnavailable timed out on its next call). Raw HTTP over a socket
to a real coordinator process."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port, start_coordinator_process, stop_process_groups

BODY = 256 * 1024  # fits in loopback socket buffers: sent whole even if never read


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    p = free_port()
    proc, _ = start_coordinator_process(str(tmp_path / "state"), p, str(tmp_path / "c.log"))
    try:
        yield p
    finally:
        stop_process_groups([proc])


def _responses(data: bytes) -> list[tuple[int, dict[str, str]]]:
    out = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        out.append((int(lines[0].split()[1]), headers))
        data = data[int(headers.get("content-length", 0)) :]
    return out


def test_an_upload_answered_before_its_body_ended_closes_the_connection(port: int) -> None:
    head = (
        f"POST /files HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {BODY}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    follow = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + b"\0" * BODY + follow)
        try:
            while chunk := s.recv(65536):
                received += chunk
        except TimeoutError:
            pytest.fail(f"the connection neither answered nor closed: {_responses(received)}")
    answers = _responses(received)
    assert answers, received
    status, headers = answers[0]
    assert status in (401, 403)  # unsigned: refused before the body was read
    assert headers.get("connection", "").lower() == "close", headers
    assert len(answers) == 1  # the next request goes on a new connection


def test_a_request_whose_body_was_read_keeps_its_connection(port: int) -> None:
    # A refusal after the whole body was read (an unsigned JSON body is refused before it is
    # read too, so a GET with no body stands for every complete request here).
    req = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(req + req)
        received = b""
        while len(_responses(received)) < 2:
            chunk = s.recv(65536)
            assert chunk, "closed after a complete request"
            received += chunk
    assert [st for st, _ in _responses(received)] == [200, 200]
    assert all(h.get("connection", "").lower() != "close" for _, h in _responses(received))
