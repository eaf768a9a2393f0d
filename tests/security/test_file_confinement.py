"""Hostile tasks against the file APIs, end to end (a real coordinator, a real root agent, real
tasks): a symlink to the agent's credential, to another job's file, a rename-exchange race towards
/etc/shadow, the TVM file API asked for the agent's own files, listings over links."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import subprocess
import sys

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from coordinator.client import BatchError
from tests.harness import cluster_ctx

JOB = "job-0000000001"
PASSWORD = "pfx-Pa55word-for-confinement"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the agent must be able to read what it must not serve"
)


async def _state(c, wi: str, task: str) -> str:
    return (await c.client.tasks.get(wi, JOB, task)).state


async def _refused(call) -> BatchError:
    """The call must be an error answer, never the file's bytes."""
    try:
        got = await call
    except BatchError as exc:
        return exc
    raise AssertionError(f"served: {got!r}"[:300])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _run_to_completion(c, wi: str, task: str, cmd: str) -> None:
    await c.client.tasks.add(wi, JOB, task, cmd)
    t = await c.wait_for(lambda: _done(c, wi, task), what=f"{task} completed")
    assert t.execution_info.exit_code == 0, await c.client.files.get_from_task(
        wi, JOB, task, "stderr.txt"
    )


async def _done(c, wi: str, task: str):
    t = await c.client.tasks.get(wi, JOB, task)
    return t if t.state == "completed" else None


async def test_symlink_to_agent_credential_is_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("thief", "p")
        await _run_to_completion(
            c, "thief", "t", "sh -c 'ln -s $WATASK_TVM_ROOT_DIR/agent-credential cred'"
        )
        tvm = (await c.client.tasks.get("thief", JOB, "t")).tvm_info.tvm_name
        for call in (
            c.client.files.get_from_task("thief", JOB, "t", "wd/cred"),
            c.client.files.get_from_tvm("p", tvm, f"tasks/thief/{JOB}/t/wd/cred"),
        ):
            e = await _refused(call)
            assert (e.status, e.code) == (403, "SymbolicLinkNotFollowed"), e
        e = await _refused(c.client.files.properties_from_task("thief", JOB, "t", "wd/cred"))
        assert e.status == 403, e


async def test_symlink_to_another_jobs_file_is_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
        await c.client.workitems.add("victim", "p")
        await c.client.workitems.add("thief", "p")
        await _run_to_completion(
            c, "victim", "v", "sh -c 'umask 077; echo victim-secret-$$ > secret'"
        )
        secret = _read(os.path.join(c.agents[0].root, "tasks", "victim", JOB, "v", "wd", "secret"))
        await _run_to_completion(
            c,
            "thief",
            "t",
            (
                f"sh -c 'ln -s $WATASK_TVM_ROOT_DIR/tasks/victim/{JOB}/v/wd/secret other; "
                f"ln -s ../../../../victim/{JOB}/v/wd other-rel; "
                f"ln -s $WATASK_TVM_ROOT_DIR/tasks/victim/{JOB}/v/wd otherdir'"
            ),
        )
        tvm = (await c.client.tasks.get("thief", JOB, "t")).tvm_info.tvm_name
        files = c.client.files
        for path in ("wd/other", "wd/other-rel/secret", "wd/otherdir/secret"):
            for call in (
                files.get_from_task("thief", JOB, "t", path),
                files.get_from_tvm("p", tvm, f"tasks/thief/{JOB}/t/{path}"),
            ):
                e = await _refused(call)
                assert (e.status, e.code) == (403, "SymbolicLinkNotFollowed"), (path, e)
            e = await _refused(files.properties_from_task("thief", JOB, "t", path))
            assert e.status == 403, (path, e)
        # The victim's own file API still serves it.
        assert await files.get_from_task("victim", JOB, "v", "wd/secret") == secret


async def test_rename_exchange_race_never_serves_etc_shadow(nursery, tmp_path):
    shadow = _read("/etc/shadow") if os.path.exists("/etc/shadow") else b""
    if len(shadow) < 8:
        pytest.skip("no /etc/shadow with content on this host to aim the race at")
    # The task swaps a regular file and a symlink to /etc/shadow with renameat2(RENAME_EXCHANGE) in a
    # loop, so a path checked as the file is opened as the link if the check and the open are apart.
    swapper = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "open('file', 'wb').write(b'harmless-' + b'x' * 64 + b'\\n')\n"
        "os.symlink('/etc/shadow', 'link')\n"
        "print('swapping', flush=True)\n"
        "end = time.monotonic() + 120\n"
        "while time.monotonic() < end:\n"
        "    if libc.renameat2(-100, b'file', -100, b'link', 2) != 0:\n"
        "        raise OSError(ctypes.get_errno(), 'renameat2')\n"
    )
    script = tmp_path / "swap.py"
    script.write_text(swapper)
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", JOB, "race", f"{sys.executable} {script}")

        async def swapping() -> bool:
            try:
                return (
                    await c.client.files.get_from_task("wi", JOB, "race", "stdout.txt")
                    == b"swapping\n"
                )
            except BatchError:
                return False

        await c.wait_for(swapping, what="the swapping task running")
        tvm = (await c.client.tasks.get("wi", JOB, "race")).tvm_info.tvm_name
        outcomes: dict[str, int] = {}
        served = 0
        end = trio.current_time() + 4
        while trio.current_time() < end:
            for call in (
                c.client.files.get_from_task("wi", JOB, "race", "wd/file"),
                c.client.files.get_from_tvm("p", tvm, f"tasks/wi/{JOB}/race/wd/link"),
            ):
                try:
                    data = await call
                except BatchError as exc:
                    outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
                    continue
                served += 1
                assert not shadow.startswith(data[:8]), "the file API served /etc/shadow"
                assert data == b"harmless-" + b"x" * 64 + b"\n"
        assert await _state(c, "wi", "race") == "running", "the swapping loop stopped early"
        assert served, outcomes  # the race ran: the regular file was served between swaps
        assert set(outcomes) <= {"SymbolicLinkNotFollowed"}, outcomes
        await c.client.tasks.terminate("wi", JOB, "race")


def _pfx() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tvm-confinement")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    raw = pkcs12.serialize_key_and_certificates(
        b"k", key, cert, None, serialization.BestAvailableEncryption(PASSWORD.encode())
    )
    return cert.fingerprint(hashes.SHA1()).hex(), base64.b64encode(raw).decode()


async def test_tvm_file_api_serves_none_of_the_agents_own_files(nursery, tmp_path):
    thumb, data = _pfx()
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.client.certificates.add(thumb, data, password=PASSWORD)
        await c.pool_with_tvms(
            "p", 1, certificate_references=[{"thumbprint": thumb, "thumbprintAlgorithm": "sha1"}]
        )
        tvm = (await c.client.tvms.list("p"))[0].name
        root = c.agents[0].root
        private = [
            n for n in ("agent-credential", "agent-id") if os.path.exists(os.path.join(root, n))
        ]
        private += [
            f"certs/sha1-{thumb}.pfx.pw",
            f"certs/sha1-{thumb}.pfx",
            f"certs/sha1-{thumb}.pem",
            "certs",
            "cache",
            "nosuch",
        ]
        for path in private:
            e = await _refused(c.client.files.get_from_tvm("p", tvm, path))
            assert (e.status, e.code) == (403, "FilePathForbidden"), (path, e)
            assert PASSWORD not in str(e)
            e = await _refused(c.client.files.properties_from_tvm("p", tvm, path))
            assert e.status == 403, (path, e)
        top = {f.name for f in await c.client.files.list_from_tvm("p", tvm)}
        assert top == {"shared", "start", "tasks"}
        everything = {f.name for f in await c.client.files.list_from_tvm("p", tvm, recursive=True)}
        assert not [n for n in everything if n.split("/")[0] not in ("shared", "start", "tasks")]


async def test_listings_show_no_link_targets(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await _run_to_completion(
            c,
            "wi",
            "links",
            (
                "sh -c 'echo plain > plain; ln -s /etc/shadow shadowlink; "
                "ln -s $WATASK_TVM_ROOT_DIR/agent-credential cred; ln -s / rootlink; mkfifo fifo'"
            ),
        )
        tvm = (await c.client.tasks.get("wi", JOB, "links")).tvm_info.tvm_name
        everything = {f.name for f in await c.client.files.list_from_tvm("p", tvm, recursive=True)}
        wd = f"tasks/wi/{JOB}/links/wd"
        assert f"{wd}/plain" in everything
        assert not [n for n in everything if n.endswith((".tvm-retention", ".tvm-cleaned"))]
        # Links (and the FIFO) are not listed, so nothing about their targets is either.
        for name in ("shadowlink", "cred", "rootlink", "fifo"):
            assert not [
                n for n in everything if n == f"{wd}/{name}" or n.startswith(f"{wd}/{name}/")
            ], name
        task_listing = {
            f.name: f
            for f in await c.client.files.list_from_task("wi", JOB, "links", recursive=True)
        }
        assert task_listing["wd/plain"].properties.content_length == len(b"plain\n")
        assert not {"wd/shadowlink", "wd/cred", "wd/rootlink", "wd/fifo"} & set(task_listing)
        e = await _refused(c.client.files.get_from_task("wi", JOB, "links", "wd/fifo"))
        assert (e.status, e.code) == (403, "NotARegularFile")


def test_task_user_cannot_hard_link_a_file_it_could_not_read(tmp_path):
    """The file API serves hard links in a task's directory as the task's own files; that is safe only
    because the kernel refuses a link to a file the user neither owns nor may read and write."""
    try:
        with open("/proc/sys/fs/protected_hardlinks") as f:
            protected = f.read().strip() == "1"
    except OSError:
        protected = False
    if not protected:
        pytest.skip(
            "fs.protected_hardlinks is not 1 on this host: task users could hard-link others' files"
        )
    # A directory nobody can write, on the same filesystem as a root-only file (both under /tmp).
    base = f"/tmp/tvm-hardlink-{os.getpid()}"
    os.mkdir(base, 0o755)
    try:
        secret = os.path.join(base, "secret")
        with open(secret, "wb") as f:
            f.write(b"root only\n")
        os.chmod(secret, 0o600)
        drop = os.path.join(base, "drop")
        os.mkdir(drop)
        os.chmod(drop, 0o777)
        res = subprocess.run(
            ["ln", secret, os.path.join(drop, "mine")], user=65534, capture_output=True
        )
        assert res.returncode != 0
        assert b"Operation not permitted" in res.stderr
        assert not os.path.exists(os.path.join(drop, "mine"))
    finally:
        shutil.rmtree(base)
