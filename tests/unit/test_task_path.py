"""Pieces of the agent's task path on a real file system: the ready-made task directories and the
check that lets a task user's sweep be skipped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tvmagent._uid_sweep import TmpWatch
from tvmagent.taskdirs import (
    CLEANED_MARKER,
    RETENTION_SUFFIX,
    SKELETON,
    TRASH,
    TaskDirStock,
    detach_task_dir,
    empty_trash,
    remove_detached,
)


def _settled(root: Path) -> TmpWatch:
    """A watch over `root` whose record is old enough to be trusted."""
    time.sleep(TmpWatch.SETTLE_NS / 1e9 + 0.02)
    watch = TmpWatch((str(root),))
    watch.refresh()
    return watch


def _world_writable(p: Path) -> Path:
    p.mkdir()
    os.chmod(p, 0o1777)
    return p


def test_nothing_changed_means_nothing_to_sweep(tmp_path: Path) -> None:
    _world_writable(tmp_path / "shared")
    watch = _settled(tmp_path)
    base = watch.baseline()
    assert base is not None
    assert set(base) == {str(tmp_path), str(tmp_path / "shared")}
    (tmp_path / "shared" / "existing-read").exists()  # reading changes nothing
    assert watch.unchanged(base)


def test_a_file_in_a_root_or_in_a_writable_subdirectory_is_seen(tmp_path: Path) -> None:
    shared = _world_writable(tmp_path / "shared")
    nested = _world_writable(shared / "nested")
    for where in (tmp_path, shared, nested):
        watch = _settled(tmp_path)
        base = watch.baseline()
        (where / f"left-{where.name}").write_text("x")
        assert not watch.unchanged(base), where


def test_a_start_reuses_the_last_clean_look_and_still_sees_a_change_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task's baseline is the last look that found nothing changed (one look per task, not two):
    a change after that look and before the task started is still caught at the task's end, and
    once a look sees a change the next start looks again."""
    from tvmagent import _uid_sweep

    shared = _world_writable(tmp_path / "shared")
    watch = _settled(tmp_path)
    looks = []
    real = _uid_sweep._stat_all
    monkeypatch.setattr(_uid_sweep, "_stat_all", lambda paths: looks.append(1) or real(paths))
    first = watch.baseline()
    assert first is not None
    assert len(looks) == 1
    assert watch.unchanged(first)
    assert len(looks) == 2
    second = watch.baseline()  # the end's look serves the next start
    assert second is not None
    assert len(looks) == 2
    (shared / "left-by-another-task").write_text("x")  # after that look, before the next start
    third = watch.baseline()
    assert third is not None  # not looked at: the task's end decides
    assert not watch.unchanged(third)
    assert watch.baseline() is None
    assert len(looks) == 4


def test_a_baseline_of_an_older_record_is_judged_by_itself(tmp_path: Path) -> None:
    """A full sweep's new record between a task's start and end: the task's end is compared with
    what it started with, never with the newer record (which may include what the task left)."""
    shared = _world_writable(tmp_path / "shared")
    watch = _settled(tmp_path)
    base = watch.baseline()
    (shared / "left").write_text("x")
    time.sleep(TmpWatch.SETTLE_NS / 1e9 + 0.02)
    watch.refresh()  # another user's sweep records the world with the task's file in it
    assert watch.baseline() is not None
    assert not watch.unchanged(base)


def test_a_directory_made_after_the_record_denies_the_baseline(tmp_path: Path) -> None:
    """A new writable directory is not in the record: tasks started after it get a full sweep."""
    watch = _settled(tmp_path)
    _world_writable(tmp_path / "late")
    assert watch.baseline() is None
    assert not watch.unchanged(None)


def test_a_record_taken_just_after_a_change_is_not_trusted(tmp_path: Path) -> None:
    """A change within the file system's timestamp granularity of the record could be missed."""
    (tmp_path / "just-now").write_text("x")
    watch = TmpWatch((str(tmp_path),))
    watch.refresh()
    assert watch.baseline() is None


def test_a_whole_second_mtime_within_a_second_is_not_trusted(tmp_path: Path) -> None:
    """A file system keeping whole seconds (mqueue): a change later in the same second would leave
    the directory's mtime as recorded, so such a record is trusted only a second later."""
    if time.time_ns() % 1_000_000_000 < 2 * TmpWatch.SETTLE_NS:
        time.sleep(2 * TmpWatch.SETTLE_NS / 1e9)  # past the fine-grained settle time
    whole = time.time_ns() // 1_000_000_000 * 1_000_000_000  # this second, no fraction
    os.utime(tmp_path, ns=(whole, whole))
    watch = TmpWatch((str(tmp_path),))
    watch.refresh()
    assert watch.baseline() is None
    os.utime(tmp_path, ns=(whole - 2_000_000_000,) * 2)  # seconds ago: trusted
    watch.refresh()
    assert watch.baseline() is not None


def test_removed_or_replaced_directory_is_a_change(tmp_path: Path) -> None:
    shared = _world_writable(tmp_path / "shared")
    watch = _settled(tmp_path)
    base = watch.baseline()
    shared.rmdir()
    assert not watch.unchanged(base)


def test_stock_directories_are_taken_by_rename(tmp_path: Path) -> None:
    root = tmp_path / "tvm"
    stock = TaskDirStock(str(root), target=4)
    stock.start()
    assert stock.wanted() == 4
    stock.add(stock.make(4))
    assert stock.wanted() == 0
    tdir = root / "tasks" / "wi" / "job" / "t1"
    assert stock.take(str(tdir))
    assert sorted(os.listdir(tdir)) == sorted(SKELETON)
    assert (tdir / "stdout.txt").read_bytes() == b""
    assert os.stat(tdir).st_mode & 0o777 == 0o700
    assert stock.wanted() == 1


def test_the_stock_is_refilled_in_chunks_not_after_every_take(tmp_path: Path) -> None:
    """Each refill is a worker-thread call: one per task cost as much CPU as the directory (and a
    burst that takes as fast as they are made kept it at one per task). The stock is made again
    once half of it is gone, all that it lacks in one go."""
    root = tmp_path / "tvm"
    stock = TaskDirStock(str(root), target=8)
    stock.start()
    assert stock.low()
    assert stock.refill() == 8
    stock.add(stock.make(8))
    assert stock.refill() == 0
    job = root / "tasks" / "wi" / "job"
    for i in range(4):  # half of it taken: not low yet
        assert stock.take(str(job / f"t{i}"))
        assert stock.refill() == 0
        assert not stock.low()
    assert stock.take(str(job / "t4"))
    assert stock.low()
    assert stock.refill() == 5
    stock.add(stock.make(2))  # made in part (a chunk), more taken meanwhile: not low, no call
    assert stock.refill() == 0
    assert stock.take(str(job / "t5"))
    assert stock.take(str(job / "t6"))
    assert stock.refill() == 5


def test_a_retry_keeps_its_directory_and_takes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "tvm"
    stock = TaskDirStock(str(root), target=2)
    stock.start()
    stock.add(stock.make(2))
    tdir = root / "tasks" / "wi" / "job" / "t1"
    (tdir / "wd").mkdir(parents=True)
    (tdir / "wd" / "result").write_text("from the first attempt")
    assert not stock.take(str(tdir))
    assert (tdir / "wd" / "result").read_text() == "from the first attempt"
    assert stock.wanted() == 0  # the ready one went back


def test_a_job_directory_removed_meanwhile_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "tvm"
    stock = TaskDirStock(str(root), target=3)
    stock.start()
    stock.add(stock.make(3))
    job = root / "tasks" / "wi" / "job"
    assert stock.take(str(job / "t1"))
    for p in sorted(job.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    job.rmdir()
    assert not stock.take(str(job / "t2"))  # the rename found no job directory: nothing lost
    assert stock.wanted() == 1
    assert stock.take(str(job / "t3"))
    assert (job / "t3" / "wd").is_dir()


def test_a_restarted_agent_takes_over_what_is_ready_and_drops_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "tvm"
    first = TaskDirStock(str(root), target=3)
    first.start()
    made = first.make(3)
    os.unlink(os.path.join(made[0], "stderr.txt"))  # interrupted while it was being made
    second = TaskDirStock(str(root), target=3)
    second.start()
    assert second.wanted() == 1
    assert not os.path.exists(made[0])


def test_the_cgroup_prefix_is_one_agents_own(tmp_path: Path) -> None:
    """Two agents given the same id on one host (another test run, a copied --name) must not
    remove each other's idle cgroups at start: the prefix includes the TVM root."""
    from tvmagent.agent import cgroup_prefix

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cgroup_prefix("agent0", a) == cgroup_prefix("agent0", a)  # a restart finds its own
    assert cgroup_prefix("agent0", a) != cgroup_prefix("agent0", b)
    assert cgroup_prefix("x" * 100, a).startswith("tvm-" + "x" * 30 + "-")


def test_the_stock_asks_ext4_to_spread_its_directories(tmp_path: Path) -> None:
    import array
    import fcntl

    from tvmagent import taskdirs

    stock = TaskDirStock(str(tmp_path / "tvm"))
    stock.start()
    fd = os.open(stock.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        try:
            fcntl.ioctl(fd, taskdirs._FS_IOC_GETFLAGS, flags, True)
        except OSError:
            pytest.skip("this file system has no inode flags (not ext2/3/4)")
        assert flags[0] & taskdirs._FS_TOPDIR_FL
    finally:
        os.close(fd)


def test_a_deleted_task_directory_moves_aside_before_it_is_removed(tmp_path: Path) -> None:
    root = str(tmp_path)
    tdir = os.path.join(root, "tasks", "wi", "job", "t")
    os.makedirs(os.path.join(tdir, "wd"))
    Path(tdir + RETENTION_SUFFIX).write_text("1")
    aside = detach_task_dir(root, tdir)
    # Its place is free at once: a run of the same task makes a new directory there.
    assert aside is not None
    assert not os.path.lexists(tdir)
    assert not os.path.exists(tdir + RETENTION_SUFFIX)
    assert os.path.dirname(aside) == os.path.join(root, TRASH)
    assert os.stat(os.path.join(root, TRASH)).st_mode & 0o777 == 0o700
    os.makedirs(os.path.join(tdir, "wd"))
    remove_detached(aside, tdir, cleaned=True)
    assert not os.path.exists(aside)
    assert os.path.isdir(os.path.join(tdir, "wd"))  # the new run's files stay
    assert not os.path.exists(tdir + CLEANED_MARKER)  # it is not "cleaned up": it runs again
    assert detach_task_dir(root, os.path.join(root, "tasks", "wi", "job", "none")) is None


def test_what_a_previous_agent_left_in_the_trash_is_removed(tmp_path: Path) -> None:
    left = tmp_path / TRASH / "123-0" / "wd"
    left.mkdir(parents=True)
    (left / "f").write_text("x")
    empty_trash(str(tmp_path))
    assert os.listdir(tmp_path / TRASH) == []
    empty_trash(str(tmp_path / "elsewhere"))  # no trash yet: nothing to do


def test_the_stock_grows_to_the_largest_burst_while_idle(tmp_path: Path) -> None:
    """Beyond its target, the stock asks for as many directories as were taken within its window
    at most (never more than `most`); takes spread wider than the window do not add up."""
    now = [0.0]
    root = tmp_path / "tvm"
    stock = TaskDirStock(str(root), target=2, most=5, window=10.0, clock=lambda: now[0])
    stock.start()
    stock.add(stock.make(2))
    assert stock.wanted_idle() == 0  # no burst seen yet: the target is enough
    job = root / "tasks" / "wi" / "job"
    for i in range(4):  # four within the window, the stock refilled as it goes
        now[0] += 1.0
        assert stock.take(str(job / f"t{i}"))
        stock.add(stock.make(stock.wanted()))
    assert stock.burst == 4
    assert stock.wanted_idle() == 2  # 4 for the next burst like it, 2 ready
    for i in range(4, 8):  # the same pace, long after: still a burst of 4 at most in 10 s...
        now[0] += 11.0
        stock.add(stock.make(1))
        assert stock.take(str(job / f"t{i}"))
    assert stock.burst == 4
    for i in range(8, 16):  # ...and a larger one counts up to `most`
        now[0] += 0.1
        stock.add(stock.make(1))
        assert stock.take(str(job / f"t{i}"))
    assert stock.burst == 5
    stock.add(stock.make(stock.wanted_idle()))
    assert stock.ready() == 5
    assert len(os.listdir(stock.dir)) == 5
    assert stock.wanted_idle() == 0


def test_the_expected_burst_comes_from_the_environment(monkeypatch, caplog) -> None:
    from tvmagent.runner import STOCK_ENV, expected_burst

    monkeypatch.delenv(STOCK_ENV, raising=False)
    assert expected_burst(100) == 0
    monkeypatch.setenv(STOCK_ENV, "40")
    assert expected_burst(100) == 40
    monkeypatch.setenv(STOCK_ENV, "4000")
    assert expected_burst(100) == 100
    assert "at most 100" in caplog.text
    monkeypatch.setenv(STOCK_ENV, "-3")
    assert expected_burst(100) == 0
    assert "not a number of task directories" in caplog.text
