"""Output files are read by the agent (root) only when the task's user could read them, and the
task's user is told by who owns its working directory. The task owns its task directory, so it can
put a symlink to a root-owned directory in the working directory's place: followed, that made root
the owner and every file readable. Real files, a real unprivileged user (nobody), root."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tvmagent.outputs import find, open_match

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def task_dir():
    # Under /tmp, traversable: pytest's tmp_path is 0700 and nobody could not reach its directory.
    base = f"/tmp/tvm-wdswap-{os.getpid()}"
    os.mkdir(base, 0o755)
    try:
        tdir = os.path.join(base, "task")
        os.mkdir(tdir, 0o700)
        os.mkdir(os.path.join(tdir, "wd"), 0o700)
        for d in (tdir, os.path.join(tdir, "wd")):
            os.chown(d, NOBODY, NOBODY)  # as the agent gives them to the task's user
        yield tdir
    finally:
        shutil.rmtree(base)


def _uploadable(tdir: str, pattern: str) -> list[str]:
    wd = os.path.join(tdir, "wd")
    out = []
    for mt in find(tdir, wd, pattern):
        got = open_match(tdir, wd, mt)
        if got is not None:
            os.close(got[0])
            out.append(mt.name)
    return out


def test_a_symlink_in_place_of_the_working_directory_makes_nothing_readable(task_dir):
    mine = subprocess.run(
        ["sh", "-c", "echo mine > ../mine.txt && chmod 600 ../mine.txt"],
        cwd=os.path.join(task_dir, "wd"),
        user=NOBODY,
        capture_output=True,
    )
    assert mine.returncode == 0, mine.stderr
    # A root-only file in the task directory: where fs.protected_hardlinks is 0 the task makes one
    # itself (`ln /etc/shadow ..`); here root puts it there.
    secret = os.path.join(task_dir, "secret.txt")
    with open(secret, "w") as f:
        f.write("root only\n")
    os.chmod(secret, 0o600)
    assert _uploadable(task_dir, "../*.txt") == ["mine.txt"]

    swap = subprocess.run(
        ["sh", "-c", "mv wd wd.old && ln -s / wd"],
        cwd=task_dir,
        user=NOBODY,
        capture_output=True,
    )
    assert swap.returncode == 0, swap.stderr
    assert os.path.islink(os.path.join(task_dir, "wd"))
    assert "secret.txt" not in _uploadable(task_dir, "../*.txt")
    assert "secret.txt" not in _uploadable(task_dir, "../**")
