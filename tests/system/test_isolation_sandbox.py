"""System tests (root) for issue 8's process sandbox, end to end through the coordinator:
tasks run as per-task unprivileged users, a task cannot read a sibling's directory, a memory hog is
killed by its cgroup limit and reported as such, certificates land before the start task (which
checks them as the task user)."""

from __future__ import annotations

import base64
import datetime as dt
import grp
import os
import pwd
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.security.pool_groups import open_agent_base
from tvmagent.isolation import POOL_GROUP_PREFIX, SLOT_PREFIX
from tvmagent.sandbox import SandboxCapabilities

PY = "/usr/bin/python3"  # readable by unprivileged users (the venv's interpreter lives under /root)
ISOLATED = ["--task-isolation", "users"]
JOB = "job-0000000001"

_caps = SandboxCapabilities.detect()
pytestmark = pytest.mark.skipif(
    not (_caps.can_switch_user and os.path.exists(PY)),
    reason="needs root, setpriv and /usr/bin/python3",
)


@pytest.fixture
def open_root():
    with open_agent_base("tvm-isolation-") as base:
        yield base


async def _run(c, pool: str, specs, wait_s: float = 60):
    await c.client.workitems.add("wi", pool)
    await c.client.tasks.add_many("wi", JOB, specs)
    await c.client.tasks.wait("wi", JOB, timeout=wait_s)
    return {t.name: t for t in await c.client.tasks.list("wi", JOB)}


async def _stdout(c, name: str) -> str:
    return (await c.client.files.get_from_task("wi", JOB, name, "stdout.txt")).decode()


# Task "a" writes a secret and waits (bounded) until "b" has tried to read it; "b" tries to read a's
# stdout.txt and directory and reports what happened. Both run at the same time (2 slots).
TASK_A = r"""
import os, time
print('secret-of-a', flush=True)
marker = os.path.join(os.environ['AZ_BATCH_NODE_SHARED_DIR'], 'b-tried')
for _ in range(600):
    if os.path.exists(marker): break
    time.sleep(0.05)
print('uid', os.getuid(), 'b-tried', os.path.exists(marker))
"""
TASK_B = r"""
import os
a_dir = os.path.join(os.path.dirname(os.environ['AZ_BATCH_TASK_DIR']), 'a')
results = []
for what, fn in (('read', lambda: open(os.path.join(a_dir, 'stdout.txt')).read()),
                 ('list', lambda: os.listdir(a_dir))):
    try:
        fn(); results.append(what + ':allowed')
    except PermissionError:
        results.append(what + ':denied')
open(os.path.join(os.environ['AZ_BATCH_NODE_SHARED_DIR'], 'b-tried'), 'w').close()
print(' '.join(results), 'uid', os.getuid())
"""


async def test_a_task_cannot_read_a_sibling_tasks_directory(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        agent = c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2, vm_size="medium")
        tasks = await _run(
            c, "p", [task_spec("a", f'{PY} -c "{TASK_A}"'), task_spec("b", f'{PY} -c "{TASK_B}"')]
        )
        assert [tasks[n].execution_info.exit_code for n in ("a", "b")] == [0, 0]
        out_a, out_b = await _stdout(c, "a"), await _stdout(c, "b")
        assert "b-tried True" in out_a  # b ran while a was still running
        assert out_b.startswith("read:denied list:denied")
        uid_a, uid_b = (
            int(out_a.split("uid ")[1].split()[0]),
            int(out_b.split("uid ")[1].split()[0]),
        )
        assert uid_a != uid_b
        assert 0 not in (uid_a, uid_b)
        for uid in (uid_a, uid_b):
            pw = pwd.getpwuid(uid)
            assert pw.pw_name.startswith(SLOT_PREFIX)
            assert grp.getgrnam(pw.pw_name)  # its own group: what it runs with as primary group
        # After the run the directory goes back to root, so the next user of that uid cannot read it.
        a_dir = os.path.join(agent.root, "tasks", "wi", JOB, "a")
        st = os.stat(a_dir)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        # runElevated tasks run as root.
        await c.client.tasks.add_many(
            "wi",
            JOB,
            [task_spec("root", f'{PY} -c "import os; print(os.getuid())"', run_elevated=True)],
        )
        await c.client.tasks.wait("wi", JOB, timeout=30)
        assert (await _stdout(c, "root")).strip() == "0"


HOG = r"""
import time
blocks = []
for i in range(64):
    blocks.append(bytearray(32 * 1024 * 1024))  # touched: bytearray zero-fills
    time.sleep(0.01)
print('survived', flush=True)
"""


@pytest.mark.skipif(
    _caps.layout.controller_dir("memory") is None, reason="no memory cgroup controller"
)
async def test_a_memory_hog_is_killed_by_its_limit_and_reported(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        # small = 1792 MiB shared by 4 slots: 448 MiB per task; the hog wants 2 GiB.
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4, vm_size="small")
        tasks = await _run(
            c, "p", [task_spec("hog", f'{PY} -c "{HOG}"'), task_spec("fine", f'{PY} -c "print(1)"')]
        )
        hog = tasks["hog"].execution_info
        assert hog.scheduling_error is not None, hog
        assert hog.scheduling_error.code == "TaskMemoryLimitExceeded"
        assert "survived" not in await _stdout(c, "hog")
        assert tasks["fine"].execution_info.exit_code == 0


def _pfx() -> tuple[str, str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=3))
        .sign(key, hashes.SHA256())
    )
    pw = "sandbox-pw"
    raw = pkcs12.serialize_key_and_certificates(
        b"k", key, cert, None, serialization.BestAvailableEncryption(pw.encode())
    )
    return cert.fingerprint(hashes.SHA1()).hex(), base64.b64encode(raw).decode(), pw


# Run by the start task AS A TASK USER: every file is there, readable by it through the task group,
# with the modes of the many-users layout (owner root, the pool's group; private material 0640).
START_CHECK = r"""
import grp, os, stat, sys
d = os.environ['AZ_BATCH_CERTIFICATES_DIR']
t = sys.argv[1]
want = {f'sha1-{t}.cer': 0o644, f'sha1-{t}.pfx': 0o640, f'sha1-{t}.pfx.pw': 0o640, f'sha1-{t}.pem': 0o640}
got = {n: stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode) for n in os.listdir(d)}
gid = os.stat(d).st_gid
owners = {(os.stat(os.path.join(d, n)).st_uid, os.stat(os.path.join(d, n)).st_gid) for n in got}
pem = open(os.path.join(d, f'sha1-{t}.pem')).read()
ok = (got == want and stat.S_IMODE(os.stat(d).st_mode) == 0o750 and owners == {(0, gid)}
      and 'PRIVATE KEY' in pem and os.getuid() != 0 and os.getgid() == gid
      and grp.getgrgid(gid).gr_name.startswith(sys.argv[2]))
print('uid', os.getuid(), sorted(got.items()), ok)
sys.exit(0 if ok else 3)
"""


async def test_certificates_are_installed_before_the_start_task_which_reads_them(
    nursery, tmp_path, open_root
):
    thumb, data, pw = _pfx()
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.client.certificates.add(thumb, data, password=pw)
        start = {
            "commandLine": f'{PY} -c "{START_CHECK}" {thumb} {POOL_GROUP_PREFIX}',
            "waitForSuccess": True,
        }
        await c.pool_with_tvms(
            "p", 1, certificate_references=[{"thumbprint": thumb}], start_task=start
        )
        tvm = (await c.client.tvms.list("p"))[0]
        assert tvm.start_task_info.exit_code == 0
        assert tvm.cert_errors == []


BWRAP_PROBE = r"""
import os
a = os.path.join(os.path.dirname(os.environ['AZ_BATCH_TASK_DIR']), 'a', 'stdout.txt')
try:
    open(a).read(); seen = 'visible'
except FileNotFoundError:
    seen = 'absent'
except PermissionError:
    seen = 'denied'
open(os.path.join(os.environ['AZ_BATCH_NODE_SHARED_DIR'], 'from-b'), 'w').write('ok')
print(seen, os.getpid())
"""


@pytest.mark.skipif(not _caps.has_bwrap, reason="bubblewrap (bwrap) not installed")
async def test_a_bubblewrap_pool_hides_other_tasks_entirely(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        agent = c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, bubblewrap=True)
        assert (await c.client.pools.get("p")).bubblewrap is True
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many("wi", JOB, [task_spec("a", f"{PY} -c \"print('secret')\"")])
        await c.client.tasks.wait("wi", JOB, timeout=30)
        await c.client.tasks.add_many("wi", JOB, [task_spec("b", f'{PY} -c "{BWRAP_PROBE}"')])
        await c.client.tasks.wait("wi", JOB, timeout=30)
        out = (await _stdout(c, "b")).split()
        assert out[0] == "absent"  # not merely denied: a's directory does not exist in b's sandbox
        assert int(out[1]) < 10  # its own pid namespace
        assert os.path.exists(os.path.join(agent.root, "shared", "from-b"))  # noqa: ASYNC240


POISON = r"""
import os
print(open('input.txt').read().strip())
try:
    open('input.txt', 'a').write('poison')
    print('modified')
except PermissionError:
    print('read-only')
"""


async def test_a_task_user_cannot_change_cached_resource_files(nursery, tmp_path, open_root):
    """Resource files are hard links into the agent's download cache: the task user reads them but
    cannot change the bytes the next task will get."""
    from coordinator.common import models as m

    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1)
        up = await c.client.files.upload(b"original\n")
        rf = [m.ResourceFile(blob_source=up["blobSource"], file_path="input.txt")]
        specs = [task_spec(f"t{i}", f'{PY} -c "{POISON}"', resource_files=rf) for i in range(2)]
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many("wi", JOB, specs[:1])
        await c.client.tasks.wait("wi", JOB, timeout=30)
        await c.client.tasks.add_many("wi", JOB, specs[1:])
        await c.client.tasks.wait("wi", JOB, timeout=30)
        tasks = {t.name: t for t in await c.client.tasks.list("wi", JOB)}
        for name in ("t0", "t1"):
            err = (await c.client.files.get_from_task("wi", JOB, name, "stderr.txt")).decode()
            assert (await _stdout(c, name)).split() == ["original", "read-only"], (tasks[name], err)
