"""Output files over real agents: uploaded after the task by condition (success, failure,
completion) to a loopback server that takes blobs as Azure Storage does (and refuses chunked
bodies), or to the coordinator's file store; retried after server errors; a refused upload
reported on the task beside its exit code; links out of the task directory never followed."""

from __future__ import annotations

import httpx2
import msgspec
import pytest

from coordinator.client import BatchError, output_file, task_spec
from coordinator.common import models as m
from tests.blobserver import blob_server
from tests.harness import cluster_ctx

JOB = "job-0000000001"


async def _done(c, name):
    t = await c.client.tasks.get("wi", JOB, name)
    return t if t.state == "completed" else None


def test_blob_server_refuses_chunked_bodies():
    """The server is a real check: a body without Content-Length (chunked) is refused."""
    with blob_server() as store:

        def gen():
            yield b"abc"

        with httpx2.Client() as h:
            r = h.put(
                f"http://127.0.0.1:{store.port}/c/x",
                content=gen(),
                headers={"x-ms-blob-type": "BlockBlob"},
            )
            assert r.status_code == 411
            r = h.put(
                f"http://127.0.0.1:{store.port}/c/x",
                content=b"abc",
                headers={"x-ms-blob-type": "BlockBlob"},
            )
            assert r.status_code == 201
        assert store.blobs == {"/c/x": b"abc"}


async def test_output_files_conditions_failures_and_links(nursery, tmp_path):
    with blob_server() as store:
        async with cluster_ctx(nursery, tmp_path, agents=1) as c:
            await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
            await c.client.workitems.add("wi", "p")
            res = store.url("res")
            big = 9 << 20  # over the in-memory size: streamed, still with a Content-Length
            make = (
                "sh -c 'mkdir -p out/sub && echo a > out/a.txt && echo b > out/sub/b.txt"
                " && echo skip > out/c.log && echo hello"
                f" && head -c {big} /dev/zero > out/big.bin; exit $CODE'"
            )
            outs = [
                output_file("out/**/*.txt", container_url=res, path="ok", condition="tasksuccess"),
                output_file(
                    "out/a.txt", container_url=res, path="bad/a.txt", condition="taskfailure"
                ),
                output_file(
                    "../std*.txt", container_url=res, path="logs", condition="taskcompletion"
                ),
                output_file("out/big.bin", container_url=res, path="big/big.bin"),
            ]
            await c.client.tasks.add_many(
                "wi",
                JOB,
                [
                    task_spec(
                        "good",
                        make.replace("$CODE", "0"),
                        output_files=[
                            output_file(
                                o.file_pattern,
                                container_url=store.url("good"),
                                path=o.destination.container.path,
                                condition=o.upload_options.upload_condition,
                            )
                            for o in outs
                        ],
                    ),
                    task_spec(
                        "bad",
                        make.replace("$CODE", "3"),
                        output_files=[
                            output_file(
                                o.file_pattern,
                                container_url=store.url("bad"),
                                path=o.destination.container.path,
                                condition=o.upload_options.upload_condition,
                            )
                            for o in outs[:3]
                        ],
                    ),
                ],
            )
            good = await c.wait_for(lambda: _done(c, "good"), what="good completed")
            bad = await c.wait_for(lambda: _done(c, "bad"), what="bad completed")
            assert good.execution_info.exit_code == 0
            assert good.execution_info.scheduling_error is None
            assert bad.execution_info.exit_code == 3
            assert bad.execution_info.scheduling_error is None
            # Success only / failure only / on completion; names below the pattern's literal dir.
            assert store.blobs["/good/ok/a.txt"] == b"a\n"
            assert store.blobs["/good/ok/sub/b.txt"] == b"b\n"
            assert store.blobs["/good/logs/stdout.txt"] == b"hello\n"
            assert "/good/logs/stderr.txt" in store.blobs
            assert len(store.blobs["/good/big/big.bin"]) == big
            assert not any(p.startswith("/good/bad/") or p.endswith(".log") for p in store.blobs)
            assert store.blobs["/bad/bad/a.txt"] == b"a\n"
            assert store.blobs["/bad/logs/stdout.txt"] == b"hello\n"
            assert not any(p.startswith("/bad/ok/") for p in store.blobs)
            # The container URL's query (the SAS) comes with every PUT.
            assert store.queries["/good/ok/a.txt"] == "sv=2023-11-03&sp=cw&sig=test%2Bsig"
            assert not [r for r in store.refused if r[1] == 411]  # never chunked

            # Server errors are retried; a refusal (403) fails the task, its exit code kept.
            store.fail_first["/flaky/f.txt"] = 2
            await c.client.tasks.add(
                "wi",
                JOB,
                "flaky",
                "sh -c 'echo f > f.txt'",
                output_files=[output_file("f.txt", container_url=store.url("flaky"), path="f.txt")],
            )
            await c.client.tasks.add(
                "wi",
                JOB,
                "denied",
                "sh -c 'echo d > d.txt; exit 7'",
                output_files=[output_file("d.txt", container_url=store.url("denied"))],
            )
            flaky = await c.wait_for(lambda: _done(c, "flaky"), what="flaky completed")
            assert flaky.execution_info.scheduling_error is None
            assert store.blobs["/flaky/f.txt"] == b"f\n"
            denied = await c.wait_for(lambda: _done(c, "denied"), what="denied completed")
            err = denied.execution_info.scheduling_error
            assert denied.execution_info.exit_code == 7
            assert (err.category, err.code) == ("UserError", "FileUploadMiscError")
            assert "d.txt" in err.message
            assert "403" in err.message
            assert "sig=" not in err.message  # the SAS never shows

            # Symlinks never followed: to a root-only file, to a directory outside (these tasks run
            # as root here; tests/security/test_output_files_isolated.py has task users).
            await c.client.tasks.add(
                "wi",
                JOB,
                "links",
                "sh -c 'mkdir out && echo mine > out/mine.txt && ln -s /etc/shadow out/shadow.txt"
                " && ln -s /etc out/etc'",
                output_files=[
                    output_file("out/**", container_url=store.url("links")),
                    output_file("out/shadow.txt", container_url=store.url("links"), path="one"),
                    output_file("out/etc/passwd", container_url=store.url("links"), path="two"),
                ],
            )
            links = await c.wait_for(lambda: _done(c, "links"), what="links completed")
            assert links.execution_info.scheduling_error is None
            got = sorted(p for p in store.blobs if p.startswith("/links/"))
            assert got == ["/links/mine.txt"]

            # The coordinator's file store: the uploads are listed on the task.
            await c.client.tasks.add(
                "wi",
                JOB,
                "stored",
                "sh -c 'mkdir r && echo one > r/1.dat && echo two > r/2.dat'",
                output_files=[output_file("r/*.dat", path="results")],
            )
            stored = await c.wait_for(lambda: _done(c, "stored"), what="stored completed")
            results = {r.path: r for r in stored.output_file_results}
            assert sorted(results) == ["results/1.dat", "results/2.dat"]
            assert await c.client.files.download(results["results/2.dat"].sha256) == b"two\n"
            assert results["results/1.dat"].size == 4
            assert stored.output_files[0].file_pattern == "r/*.dat"


BAD = [
    ({"filePattern": "/etc/*", "destination": {"fileStore": {}}}, "filePattern"),
    ({"filePattern": "a/../../b", "destination": {"fileStore": {}}}, "filePattern"),
    ({"filePattern": "x", "destination": {}}, "exactly one"),
    (
        {"filePattern": "x", "destination": {"container": {"containerUrl": "ftp://h/c"}}},
        "containerUrl",
    ),
    (
        {
            "filePattern": "x",
            "destination": {"fileStore": {}},
            "uploadOptions": {"uploadCondition": "sometimes"},
        },
        "uploadCondition",
    ),
]


async def test_bad_output_files_refused(nursery, tmp_path):
    """Each bad entry: a clear 400 naming what is wrong, and no task stored."""
    async with cluster_ctx(nursery, tmp_path) as c:
        await c.client.pools.add("p", target_dedicated=0)
        await c.client.workitems.add("wi", "p")
        for entry, why in BAD:
            bad = msgspec.convert(entry, type=m.OutputFile)
            with pytest.raises(BatchError) as ei:
                await c.client.tasks.add("wi", JOB, "t", "true", output_files=[bad])
            assert ei.value.status == 400, entry
            assert why in str(ei.value), entry
            with pytest.raises(BatchError) as ei:
                await c.client.tasks.get("wi", JOB, "t")
            assert ei.value.status == 404
