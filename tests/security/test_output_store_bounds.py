"""What a task puts in the coordinator's file store through its output files is named in its
completion: one agent message (over the link's 64 MiB limit it closes the link instead of
arriving) and one journal row. The names a task chooses (a path 100 levels of 255-character names
deep) and the number of files are bounded: past either, the task fails with a clear upload error
and the rest is not uploaded. The agent's uploader against a real coordinator over HTTP, on real
files."""

from __future__ import annotations

import os

import httpx2
import pytest

from protocol import messages as pm
from tests.harness import cluster_ctx
from tvmagent import outputs
from tvmagent.outputs import Uploader


def _uploader(c, http: httpx2.AsyncClient) -> Uploader:  # noqa: ANN001 - harness cluster
    token = c.rc.join_token
    return Uploader(
        lambda: http,
        lambda: c.rc.endpoint.rstrip("/"),
        lambda: {"x-tvm-agent-token": token},
        backoff=0.01,
    )


def _task_dir(tmp_path) -> tuple[str, str]:  # noqa: ANN001
    wd = tmp_path / "task" / "wd"
    wd.mkdir(parents=True)
    return str(tmp_path / "task"), str(wd)


async def test_a_task_storing_more_files_than_the_bound_fails_naming_it(
    nursery, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "MAX_STORED", 5)  # 10,000 in production
    tdir, wd = _task_dir(tmp_path)
    for i in range(8):
        with open(os.path.join(wd, f"out{i}.txt"), "w") as f:
            f.write(f"result {i}\n")
    spec = pm.OutputFileSpec(pattern="out*.txt")
    async with cluster_ctx(nursery, tmp_path) as c, httpx2.AsyncClient(timeout=30) as http:
        failure, stored = await _uploader(c, http).run([spec], tdir, wd, 0, None)
        assert failure is not None
        assert failure.code == "FileUploadMiscError"
        assert "more than 5 files" in failure.message
        assert [s.path for s in stored] == [f"out{i}.txt" for i in range(5)]
        assert len(await c.client.files.list_stored()) == 5


async def test_a_blob_name_over_1024_characters_fails_and_is_not_uploaded(
    nursery, tmp_path
) -> None:
    tdir, wd = _task_dir(tmp_path)
    deep = os.path.join(wd, *(["d" * 250] * 5))
    os.makedirs(deep)
    with open(os.path.join(deep, "x.txt"), "w") as f:
        f.write("x\n")
    with open(os.path.join(wd, "short.txt"), "w") as f:
        f.write("short\n")
    async with cluster_ctx(nursery, tmp_path) as c, httpx2.AsyncClient(timeout=30) as http:
        failure, stored = await _uploader(c, http).run(
            [pm.OutputFileSpec(pattern="short.txt"), pm.OutputFileSpec(pattern="**/*.txt")],
            tdir,
            wd,
            0,
            None,
        )
        assert failure is not None
        assert "over 1024 characters" in failure.message
        assert len(failure.message) < 600
        assert [s.path for s in stored] == ["short.txt"]
