"""Output file patterns matched on real files as Azure Batch matches them (tvmagent/outputs.py)."""

from __future__ import annotations

import os

import pytest

from protocol import messages as pm
from tvmagent.outputs import blob_name, container_target, find, split_pattern, wanted


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
    matches = find(*task, pattern)
    try:
        return sorted(m.name for m in matches)
    finally:
        for m in matches:
            os.close(m.fd)


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

    return Match(name, -1, 0)
