"""What runs on the test's ssh "hosts" (this machine, seen through /proc): agent processes found by
their directory in the command line, and a watcher that samples every process's command line for
a secret while a test runs; a venv with a working `tvm` made in a moment."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import threading
from types import TracebackType


def agent_pids(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and running(int(entry)):
            pids.append(int(entry))
    return pids


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class CmdlineWatch:
    """Scans /proc/*/cmdline (all processes, every namespace below ours) every 10 ms
    until closed; `hits` lists the command lines that held the secret, `scans` how many passes
    were made (a watcher that never ran proves nothing)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.hits: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if self.secret in cmd:
                    self.hits.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1


def ready_made_venv(path: str, python: str) -> str:
    """A venv with a working `tvm` made without pip (fast): its site-packages reaches this
    interpreter's (where this checkout is installed), and bin/tvm is its entry point. `python`
    makes it (the same minor version as this one)."""
    subprocess.run([python, "-m", "venv", "--without-pip", path], check=True)
    site = subprocess.run(
        [f"{path}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "tvm_test_reuse.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    tvm = os.path.join(path, "bin", "tvm")
    with open(tvm, "w") as f:
        f.write(
            f"#!{path}/bin/python\nimport sys\nfrom coordinator.cli import main\nsys.exit(main())\n"
        )
    os.chmod(tvm, 0o755)
    return tvm
