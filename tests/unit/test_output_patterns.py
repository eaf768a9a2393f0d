"""Output file patterns matched on real files as Azure Batch matches them (tvmagent/outputs.py)."""

from __future__ import annotations

import os

import pytest

from protocol import messages as pm
from tvmagent.outputs import blob_name, container_target, find, open_match, split_pattern, wanted


@pytest.fixture
def task(tmp_path):
    wd = tmp_path / "wd"
    for rel in ("a.txt", "b.txt", "ab.log", "d/c.txt", "d/e/f.txt", "d/e/g.bin", ".hidden.txt"):
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)
    (tmp_path / "stdout.txt").write_text("out")
    (tmp_path / "stderr.txt").write_text("err")
    os.symlink("/etc", wd / "link")
    os.symlink(wd / "a.txt", wd / "alias.txt")
    return str(tmp_path), str(wd)


def _names(task, pattern):
    """What is uploaded: the matches that open (a regular file the task's user could read)."""
    out = []
    for m in find(*task, pattern):
        got = open_match(*task, m)
        if got is not None:
            os.close(got[0])
            out.append(m.name)
    return sorted(out)


def test_a_file_the_task_user_could_not_read_is_not_opened(task, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand files to another user")
    _tdir, wd = task
    os.chown(wd, 65534, 65534)  # the task ran as nobody
    os.chmod(os.path.join(wd, "a.txt"), 0o640)  # root's, not its group's
    os.chown(os.path.join(wd, "b.txt"), 65534, 65534)
    assert _names(task, "?.txt") == ["b.txt"]


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("*.txt", [".hidden.txt", "a.txt", "b.txt"]),  # never alias.txt: a symlink
        ("?.txt", ["a.txt", "b.txt"]),
        ("[a]*", ["a.txt", "ab.log"]),
        ("[!a]*.txt", [".hidden.txt", "b.txt"]),
        ("**/*.txt", [".hidden.txt", "a.txt", "b.txt", "d/c.txt", "d/e/f.txt"]),
        ("d/**", ["c.txt", "e/f.txt", "e/g.bin"]),
        ("d/**/f.txt", ["e/f.txt"]),
        ("d/e/g.bin", ["g.bin"]),
        ("../std*.txt", ["stderr.txt", "stdout.txt"]),
        ("missing/*.txt", []),
        ("link/passwd", []),  # a symlinked directory is not entered
        ("link/*", []),
        ("alias.txt", []),
    ],
)
def test_patterns(task, pattern, names):
    assert _names(task, pattern) == names


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../x", "a/../../b", "..", "../"])
def test_patterns_outside_are_refused(bad):
    with pytest.raises(ValueError, match="relative path"):
        split_pattern(bad)


def test_names_targets_and_conditions():
    one = pm.OutputFileSpec(pattern="d/e/g.bin", path="out/g")
    assert blob_name(one, _m("g.bin"), single=True) == "out/g"
    many = pm.OutputFileSpec(pattern="d/**", path="pre/")
    assert blob_name(many, _m("e/f.txt"), single=False) == "pre/e/f.txt"
    assert (
        container_target("https://acct.blob.example/cont?sv=1&sig=a%2Bb", "pre/a b.txt")
        == "https://acct.blob.example/cont/pre/a%20b.txt?sv=1&sig=a%2Bb"
    )
    fail = pm.Failure(category="UserError", code="X")
    assert [wanted(c, 0, None) for c in ("tasksuccess", "taskfailure", "taskcompletion")] == [
        True,
        False,
        True,
    ]
    assert [wanted(c, 0, fail) for c in ("tasksuccess", "taskfailure", "taskcompletion")] == [
        False,
        True,
        True,
    ]


def _m(name):
    from tvmagent.outputs import Match

    return Match(name, [name], False)
