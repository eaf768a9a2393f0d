import hashlib
import os
from collections.abc import AsyncIterator, Iterable

import pytest

from coordinator.runtime.filestore import FileStore, FileStoreError, parse_range_header

DATA = bytes(range(256)) * 1000  # 256000 bytes
DATA_SHA = hashlib.sha256(DATA).hexdigest()


async def stream(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def chunked(data: bytes, n: int = 7777) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


def stored_files(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files)
    return out


async def test_put_stat_and_layout(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    sf = await store.put(stream(chunked(DATA)), expected_sha256=DATA_SHA)
    assert sf.sha256 == DATA_SHA
    assert sf.size == len(DATA)
    assert sf.created.tzinfo is not None
    path = tmp_path / DATA_SHA[:2] / DATA_SHA[2:4] / DATA_SHA
    assert path.read_bytes() == DATA
    assert store.stat(DATA_SHA) == sf
    assert store.list() == [sf]
    # nothing left in the temp area
    assert os.listdir(tmp_path / ".tmp") == []


async def test_put_without_declared_hash_and_idempotent(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    first = await store.put(stream([b"hello ", b"world"]))
    assert first.sha256 == hashlib.sha256(b"hello world").hexdigest()
    again = await store.put(stream([b"hello world"]), expected_sha256=first.sha256)
    assert again == first  # same created timestamp: the original blob was kept
    assert len(stored_files(str(tmp_path))) == 1


async def test_put_empty_file(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    sf = await store.put(stream([]))
    assert sf.size == 0
    assert sf.sha256 == hashlib.sha256(b"").hexdigest()
    f, start, length = store.open_range(sf.sha256)
    with f:
        assert (start, length) == (0, 0)
        assert f.read() == b""


async def test_put_hash_mismatch_keeps_nothing(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(FileStoreError) as info:
        await store.put(stream(chunked(DATA)), expected_sha256=wrong)
    assert info.value.code == "FileHashMismatch"
    assert wrong in info.value.message
    assert DATA_SHA in info.value.message
    assert stored_files(str(tmp_path)) == []
    assert store.list() == []
    with pytest.raises(FileStoreError) as info2:
        store.stat(wrong)
    assert info2.value.code == "FileNotFound"


async def test_put_failing_stream_keeps_nothing(tmp_path) -> None:
    store = FileStore(str(tmp_path))

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial data"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put(broken())
    assert stored_files(str(tmp_path)) == []


async def test_put_max_size(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    with pytest.raises(FileStoreError) as info:
        await store.put(stream(chunked(DATA)), max_size=1000)
    assert info.value.code == "FileTooLarge"
    assert stored_files(str(tmp_path)) == []
    sf = await store.put(stream([b"x" * 1000]), max_size=1000)
    assert sf.size == 1000


async def test_put_rejects_non_bytes_chunks(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    with pytest.raises(TypeError, match="must be bytes"):
        await store.put(stream(["text"]))  # type: ignore[list-item]
    assert stored_files(str(tmp_path)) == []


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        DATA_SHA.upper(),
        DATA_SHA + "0",
        DATA_SHA[:-1] + "g",
        DATA_SHA + "\n",
        "../" + DATA_SHA[3:],
    ],
)
async def test_invalid_hash_strings(tmp_path, bad: str) -> None:
    store = FileStore(str(tmp_path))
    for call in (store.stat, store.delete, store.open_range):
        with pytest.raises(FileStoreError) as info:
            call(bad)
        assert info.value.code == "InvalidHash"
        assert "64 lowercase hex" in info.value.message
    with pytest.raises(FileStoreError) as info:
        await store.put(stream([b"x"]), expected_sha256=bad)
    assert info.value.code == "InvalidHash"
    assert stored_files(str(tmp_path)) == []


def test_missing_file(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    for call in (store.stat, store.delete, store.open_range):
        with pytest.raises(FileStoreError) as info:
            call(DATA_SHA)
        assert info.value.code == "FileNotFound"


async def test_open_range_reads(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    await store.put(stream([DATA]))
    for start, end, expect in [
        (0, None, DATA),
        (0, 0, DATA[:1]),
        (10, 99, DATA[10:100]),
        (len(DATA) - 5, None, DATA[-5:]),
        (len(DATA) - 1, len(DATA) - 1, DATA[-1:]),
    ]:
        f, s, length = store.open_range(DATA_SHA, start, end)
        with f:
            assert s == start
            assert f.tell() == start
            assert f.read(length) == expect
            assert length == len(expect)


@pytest.mark.parametrize(
    ("start", "end"),
    [(-1, None), (5, 4), (len(DATA), None), (0, len(DATA)), (10**12, None), (True, None)],
)
async def test_open_range_invalid(tmp_path, start, end) -> None:
    store = FileStore(str(tmp_path))
    await store.put(stream([DATA]))
    with pytest.raises(FileStoreError) as info:
        store.open_range(DATA_SHA, start, end)
    assert info.value.code == "InvalidRange"


async def test_open_range_on_empty_file_beyond_start(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    sf = await store.put(stream([b""]))
    with pytest.raises(FileStoreError) as info:
        store.open_range(sf.sha256, 0, 0)
    assert info.value.code == "InvalidRange"


async def test_delete_and_list(tmp_path) -> None:
    store = FileStore(str(tmp_path))
    a = await store.put(stream([b"a"]))
    b = await store.put(stream([b"b"]))
    assert store.list() == sorted([a, b], key=lambda s: s.sha256)
    store.delete(a.sha256)
    assert store.list() == [b]
    with pytest.raises(FileStoreError) as info:
        store.delete(a.sha256)
    assert info.value.code == "FileNotFound"
    # a re-upload after delete works
    assert (await store.put(stream([b"a"]))).sha256 == a.sha256


def test_stale_parts_are_cleaned_on_open(tmp_path) -> None:
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "dead.part").write_bytes(b"junk")
    (tmp_path / "zz").mkdir()  # foreign directories are ignored by list()
    store = FileStore(str(tmp_path))
    assert os.listdir(tmp_path / ".tmp") == []
    assert store.list() == []


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("", 10, None),
        ("   ", 10, None),
        ("bytes=0-99", 1000, (0, 99)),
        ("bytes=0-99", 50, (0, 49)),  # end clamped to the resource
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-5", 100, (95, 99)),
        ("bytes=-500", 100, (0, 99)),  # suffix longer than the file: whole file
        ("bytes=99-99", 100, (99, 99)),
        ("Bytes = 1 - 2 ", 100, (1, 2)),
        ("bytes=0-0", 1, (0, 0)),
        ("bytes=5-" + "9" * 5000, 100, (5, 99)),  # past any size: to the end
        ("bytes=-" + "9" * 5000, 100, (0, 99)),  # (Python refuses to read 5,000 digits)
    ],
)
def test_parse_range_ok(header, size, expected) -> None:
    assert parse_range_header(header, size) == expected
    assert FileStore.parse_range_header(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size", "fragment"),
    [
        ("bytes=100-", 100, "beyond the end"),
        ("bytes=100-200", 100, "beyond the end"),
        ("bytes=0-", 0, "beyond the end"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=-5", 0, "unsatisfiable"),
        ("bytes=5-4", 100, "end before start"),
        ("bytes=-", 100, "no positions"),
        ("bytes=0-1,5-6", 100, "multiple ranges"),
        ("items=0-1", 100, "malformed"),
        ("bytes=a-b", 100, "malformed"),
        ("bytes=-1-2", 100, "malformed"),
        ("bytes=+1-2", 100, "malformed"),
        ("0-99", 100, "malformed"),
        ("bytes=" + "9" * 5000 + "-", 100, "beyond the end"),
        ("bytes=" + "9" * 30 + "-" + "9" * 29, 100, "beyond the end"),
    ],
)
def test_parse_range_invalid(header, size, fragment) -> None:
    with pytest.raises(FileStoreError) as info:
        parse_range_header(header, size)
    assert info.value.code == "InvalidRange"
    assert fragment in info.value.message
    assert len(info.value.message) < 200  # a long header is quoted cut short
