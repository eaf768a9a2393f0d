"""A task shapes the tree its output-file patterns walk (the agent, root, walks it after the task):
nested deeper than Python's recursion limit it failed the task with the agent's RecursionError
after holding one descriptor per level (under a 1,024-descriptor limit, all the agent had; the
tests stay shallower: pytest cannot remove a tree that deep from its temp dirs), and
every entry of a huge directory was held in memory to sort it. Both are bounded, each with an
error naming what the task did. Real directories and files."""

from __future__ import annotations

import os

import pytest

from tvmagent import outputs
from tvmagent.outputs import UploadError, find


@pytest.fixture
def task_dir(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    return str(tmp_path), str(wd)


def _nest(wd: str, levels: int) -> None:
    here = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=here)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
            os.close(here)
            here = nxt
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=here))
    finally:
        os.close(here)


def test_a_tree_nested_past_the_limit_is_a_clear_upload_error(task_dir) -> None:
    tdir, wd = task_dir
    _nest(wd, outputs.MAX_DEPTH + 50)
    with pytest.raises(UploadError) as err:
        find(tdir, wd, "**/*.txt")
    assert f"nest more than {outputs.MAX_DEPTH} levels" in err.value.message
    assert len(str(err.value)) < 400  # the path is shortened


def test_a_tree_as_deep_as_the_limit_is_walked(task_dir) -> None:
    tdir, wd = task_dir
    _nest(wd, outputs.MAX_DEPTH)
    (got,) = find(tdir, wd, "**/*.txt")
    assert got.name.endswith("/deep.txt")
    assert got.name.count("/") == outputs.MAX_DEPTH


def test_a_walk_past_its_entry_budget_is_a_clear_upload_error(
    task_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    tdir, wd = task_dir
    monkeypatch.setattr(outputs, "MAX_WALKED", 1_000)  # 200,000 in production
    os.mkdir(os.path.join(wd, "many"))
    for i in range(1_200):
        open(os.path.join(wd, "many", f"{i}.dat"), "w").close()
    with pytest.raises(UploadError) as err:
        find(tdir, wd, "**/*.txt")  # matches nothing, yet walks everything
    assert "more than 1000 entries" in err.value.message
    assert len(find(tdir, wd, "many/1.dat")) == 1  # a literal name walks nothing
