"""Issue 4 items 2 and 5 with real agents: resource files (http(s) and the file store), failed
downloads, the file store's checks, and task/TVM file APIs (list, get, range, properties)."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from coordinator.client import BatchError, task_spec
from coordinator.client._http import _Call
from coordinator.common import models as m
from tests.harness import REPO, agent_env, cluster_ctx

JOB = "job-0000000001"
DATA = os.urandom(300_000)
OTHER = os.urandom(1000)
BLOB = os.urandom(70_000)
SAS = "sv=2015-04-05&sr=b&sig=SeCrEt%2Babc%3D&se=2026-01-01T00%3A00%3A00Z"


class _Server:
    """A local HTTP server: /data.bin, /other.bin, /forbidden (403); anything else 404."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.counts: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.paths.append(self.path)
                server.counts[path] += 1
                body = {"/data.bin": DATA, "/other.bin": OTHER}.get(path)
                status = 200 if body is not None else 403 if path == "/forbidden" else 404
                body = body if body is not None else b"no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _done(c, name):
    t = await c.client.tasks.get("wi", JOB, name)
    return t if t.state == "completed" else None


async def test_resource_files_from_http_and_file_store(nursery, tmp_path):
    with _Server() as http:
        async with cluster_ctx(nursery, tmp_path, agents=1) as c:
            await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
            await c.client.workitems.add("wi", "p")

            # File store: a wrong declared hash is refused and nothing is stored.
            before = await _store_list(c)
            with pytest.raises(BatchError) as e:
                await c.client.files.upload(BLOB, sha256=_sha(b"something else"))
            assert (e.value.status, e.value.code) == (400, "FileHashMismatch")
            with pytest.raises(BatchError) as e:
                await c.client.files.upload(BLOB, sha256="not-a-hash")
            assert e.value.status == 400
            assert await _store_list(c) == before
            # `tvm file upload` and the Python client store the same content once.
            path = tmp_path / "blob.bin"
            path.write_bytes(BLOB)
            cli = await trio.run_process(
                [
                    sys.executable,
                    "-c",
                    "from coordinator.cli import main; main()",
                    "file",
                    "upload",
                    str(path),
                ],
                capture_stdout=True,
                capture_stderr=True,
                cwd=REPO,
                env=agent_env(
                    {
                        "TVM_ENDPOINT": c.rc.endpoint,
                        "TVM_ACCOUNT": c.rc.account,
                        "TVM_KEY": c.rc.key,
                    }
                ),
            )
            source = cli.stdout.decode().strip()
            assert source == f"filestore:sha256:{_sha(BLOB)}"
            res = await c.client.files.upload(BLOB, sha256=_sha(BLOB))
            assert res == {"sha256": _sha(BLOB), "size": len(BLOB), "blobSource": source}
            assert {f["sha256"] for f in await _store_list(c)} == {f["sha256"] for f in before} | {
                _sha(BLOB)
            }
            part = await c.client._call(
                _Call(
                    "GET",
                    f"/files/sha256/{_sha(BLOB)}",
                    headers={"Range": "bytes=10-19"},
                    parse=lambda r: (r.status_code, r.content),
                )
            )
            assert part == (206, BLOB[10:20])

            url = f"{http.base}/data.bin?{SAS}"
            files = [
                m.ResourceFile(blob_source=url, file_path="in/data.bin"),
                m.ResourceFile(blob_source=source, file_path="store/blob.bin"),
            ]
            show = "sh -c 'stat -c %a in/data.bin store/blob.bin'"
            bad = f"{http.base}/other.bin"
            await c.client.tasks.add_many(
                "wi",
                JOB,
                [
                    task_spec("rf", show, resource_files=files),
                    task_spec(
                        "nf",
                        "true",
                        resource_files=[
                            m.ResourceFile(blob_source=f"{http.base}/missing", file_path="x")
                        ],
                        max_task_retry_count=3,
                    ),
                    task_spec(
                        "forbid",
                        "true",
                        resource_files=[
                            m.ResourceFile(blob_source=f"{http.base}/forbidden", file_path="x")
                        ],
                        max_task_retry_count=3,
                    ),
                    task_spec(
                        "unreach",
                        "true",
                        resource_files=[
                            m.ResourceFile(
                                blob_source=f"http://127.0.0.1:{_closed_port()}/x", file_path="x"
                            )
                        ],
                        max_task_retry_count=3,
                    ),
                    task_spec(
                        "badhash",
                        "true",
                        resource_files=[
                            m.ResourceFile(blob_source=bad, file_path="x", sha256=_sha(b"not it"))
                        ],
                        max_task_retry_count=3,
                    ),
                ],
            )
            rf = await c.wait_for(lambda: _done(c, "rf"), what="rf completed")
            assert rf.execution_info.exit_code == 0, await c.client.files.get_from_task(
                "wi", JOB, "rf", "stderr.txt"
            )
            assert (
                await c.client.files.get_from_task("wi", JOB, "rf", "stdout.txt") == b"770\n770\n"
            )
            wd = os.path.join(c.agents[0].root, "tasks", "wi", JOB, "rf", "wd")
            for rel, want in (("in/data.bin", DATA), ("store/blob.bin", BLOB)):
                assert _read(os.path.join(wd, rel)) == want, rel
                assert os.stat(os.path.join(wd, rel)).st_mode & 0o777 == 0o770
            assert await c.client.files.get_from_task("wi", JOB, "rf", "wd/in/data.bin") == DATA
            assert (
                http.paths.count(f"/data.bin?{SAS}") == 1
            )  # the SAS query reached the server intact

            # The same URL again on the same TVM comes from the cache.
            await c.client.tasks.add("wi", JOB, "rf2", show, resource_files=files)
            rf2 = await c.wait_for(lambda: _done(c, "rf2"), what="rf2 completed")
            assert rf2.execution_info.exit_code == 0
            assert rf2.tvm_info.tvm_name == rf.tvm_info.tvm_name
            assert http.counts["/data.bin"] == 1
            assert (
                _read(
                    os.path.join(
                        c.agents[0].root, "tasks", "wi", JOB, "rf2", "wd", "in", "data.bin"
                    )
                )
                == DATA
            )

            # Failed downloads: completed with a UserError naming the cause, never retried.
            for name, code in (
                ("nf", "ResourceFileNotFound"),
                ("forbid", "ResourceFileAccessDenied"),
                ("unreach", "ResourceFileUnreachable"),
                ("badhash", "ResourceFileHashMismatch"),
            ):
                t = await c.wait_for(lambda name=name: _done(c, name), what=f"{name} completed")
                err = t.execution_info.scheduling_error
                assert (err.category, err.code) == ("UserError", code), (name, err)
                assert err.message
                assert t.execution_info.retry_count == 0
                assert t.execution_info.exit_code != 0
            assert http.counts["/missing"] == 1
            assert http.counts["/forbidden"] == 1

            # Paths escaping the task directory are refused when the task is added.
            for p in ("../x", "/etc/x", "a/../../x"):
                with pytest.raises(BatchError) as e:
                    await c.client.tasks.add(
                        "wi",
                        JOB,
                        "escape",
                        "true",
                        resource_files=[m.ResourceFile(blob_source=url, file_path=p)],
                    )
                assert (e.value.status, e.value.code) == (400, "InvalidResourceFilePath")
            with pytest.raises(BatchError) as e:
                await c.client.tasks.get("wi", JOB, "escape")
            assert e.value.status == 404


async def _store_list(c):
    import msgspec

    return await c.client._call(
        _Call("GET", "/files", parse=lambda r: msgspec.json.decode(r.content)["value"])
    )


async def test_task_and_tvm_files(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
        await c.client.workitems.add("wi", "p")
        script = (
            "sh -c 'mkdir -p sub/deeper; echo deep > sub/deeper/f.txt; printf 0123456789 > digits; "
            "echo partial-out; echo partial-err >&2; sleep 100'"
        )
        await c.client.tasks.add("wi", JOB, "run", script)

        async def partial():
            try:
                return (
                    await c.client.files.get_from_task("wi", JOB, "run", "stdout.txt")
                    == b"partial-out\n"
                )
            except BatchError:
                return False

        await c.wait_for(partial, what="partial stdout of the running task")
        assert (await c.client.tasks.get("wi", JOB, "run")).state == "running"
        assert (
            await c.client.files.get_from_task("wi", JOB, "run", "stderr.txt") == b"partial-err\n"
        )

        top = {f.name: f for f in await c.client.files.list_from_task("wi", JOB, "run")}
        assert {"stdout.txt", "stderr.txt", "wd"} <= set(top)
        assert top["wd"].is_directory
        assert top["wd"].properties is None
        assert top["stdout.txt"].properties.content_length == len(b"partial-out\n")
        assert "wd/digits" not in top
        deep = {
            f.name: f for f in await c.client.files.list_from_task("wi", JOB, "run", recursive=True)
        }
        assert {"wd/digits", "wd/sub", "wd/sub/deeper", "wd/sub/deeper/f.txt"} <= set(deep)
        assert deep["wd/sub/deeper/f.txt"].properties.content_length == 5

        assert await c.client.files.get_from_task("wi", JOB, "run", "wd/digits") == b"0123456789"
        assert (
            await c.client.files.get_from_task("wi", JOB, "run", "wd/digits", byte_range=(2, 5))
            == b"2345"
        )
        props = await c.client.files.properties_from_task("wi", JOB, "run", "wd/digits")
        assert props["size"] == 10
        mtime = datetime.fromisoformat(props["lastModified"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - mtime).total_seconds()) < 120

        # The same files through the TVM.
        tvm = (await c.client.tasks.get("wi", JOB, "run")).tvm_info.tvm_name
        rel = f"tasks/wi/{JOB}/run/wd/digits"
        assert await c.client.files.get_from_tvm("p", tvm, rel, byte_range=(7, 9)) == b"789"
        assert (await c.client.files.properties_from_tvm("p", tvm, rel))["size"] == 10
        everything = {f.name for f in await c.client.files.list_from_tvm("p", tvm, recursive=True)}
        assert rel in everything
        assert f"tasks/wi/{JOB}/run/wd/sub/deeper/f.txt" in everything
        assert "tasks/wi" not in {f.name for f in await c.client.files.list_from_tvm("p", tvm)}

        # Clear errors.
        for call in (
            c.client.files.get_from_task("wi", JOB, "run", "wd/nope"),
            c.client.files.properties_from_task("wi", JOB, "run", "wd/nope"),
        ):
            with pytest.raises(BatchError) as e:
                await call
            assert (e.value.status, e.value.code) == (404, "FileNotFound")
        with pytest.raises(BatchError) as e:
            await c.client.files.get_from_task("wi", JOB, "run", "wd/digits", byte_range=(50, 60))
        assert e.value.status == 416
        with pytest.raises(BatchError) as e:
            await c.client.files.get_from_task("wi", JOB, "nosuchtask", "stdout.txt")
        assert e.value.status == 404
        await c.client.tasks.terminate("wi", JOB, "run")
        await c.wait_for(lambda: _done(c, "run"), what="run terminated")
