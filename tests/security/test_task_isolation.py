"""Hostile tasks against the users-and-groups isolation, end to end: a real coordinator and real root
agents running tasks as per-task slot users.

* a task in pool B reads pool A's certificate files (pfx, password, PEM key) on the same host;
* a task writes into ``start/`` after the start task ran;
* a task leaves a 0600 file in /dev/shm and /tmp for the next task that gets the same slot user.
"""

from __future__ import annotations

import base64
import ctypes
import datetime as dt
import grp
import os
import platform
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.security.pool_groups import open_agent_base
from tvmagent.sandbox import SandboxCapabilities

PY = "/usr/bin/python3"  # readable by task users (the venv's interpreter lives under /root)
ISOLATED = ["--task-isolation", "users"]
JOB = "job-0000000001"

_caps = SandboxCapabilities.detect()
pytestmark = pytest.mark.skipif(
    not (_caps.can_switch_user and os.path.exists(PY)),
    reason="needs root, setpriv and /usr/bin/python3",
)


@pytest.fixture
def open_root():
    with open_agent_base("tvm-sec-") as base:
        yield base


async def _run_one(c, workitem: str, pool: str, name: str, command: str) -> str:
    """Run one task to its end in `workitem` (created on first use); its stdout."""
    if workitem not in {w.name for w in await c.client.workitems.list()}:
        await c.client.workitems.add(workitem, pool)
    await c.client.tasks.add_many(workitem, JOB, [task_spec(name, command)])
    await c.client.tasks.wait(workitem, JOB, timeout=60)
    task = await c.client.tasks.get(workitem, JOB, name)
    out = (await c.client.files.get_from_task(workitem, JOB, name, "stdout.txt")).decode()
    err = (await c.client.files.get_from_task(workitem, JOB, name, "stderr.txt")).decode()
    assert task.execution_info.exit_code == 0, (task.execution_info, out, err)
    return out


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _pfx() -> tuple[str, str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "isolation-test")])
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
    pw = f"pw-{uuid.uuid4().hex}"
    raw = pkcs12.serialize_key_and_certificates(
        b"k", key, cert, None, serialization.BestAvailableEncryption(pw.encode())
    )
    return cert.fingerprint(hashes.SHA1()).hex(), base64.b64encode(raw).decode(), pw


# Tries to read each path given; prints one word per path: allowed / denied / absent.
READ = r"""
import os, sys
res = []
for p in sys.argv[1:]:
    try:
        open(p, 'rb').read(); res.append('allowed')
    except PermissionError:
        res.append('denied')
    except FileNotFoundError:
        res.append('absent')
print(' '.join(res), 'uid', os.getuid())
"""


async def test_a_task_in_another_pool_cannot_read_a_pools_certificates(
    nursery, tmp_path, open_root
):
    thumb, data, pw = _pfx()
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        a = c.start_agent("a", extra_args=ISOLATED, root=os.path.join(open_root, "a"))
        await c.client.certificates.add(thumb, data, password=pw)
        await c.pool_with_tvms("pa", 1, certificate_references=[{"thumbprint": thumb}])
        c.start_agent("b", extra_args=ISOLATED, root=os.path.join(open_root, "b"))
        await c.pool_with_tvms("pb", 1)
        secret = [
            os.path.join(a.root, "certs", f"sha1-{thumb}{s}") for s in (".pfx", ".pfx.pw", ".pem")
        ]
        for p in secret:
            assert os.path.exists(p), p  # noqa: ASYNC240 - installed on A's TVM
        cmd = f'{PY} -c "{READ}" {" ".join(secret)}'
        own = (await _run_one(c, "wa", "pa", "own", cmd)).split()
        other = (await _run_one(c, "wb", "pb", "other", cmd)).split()
        assert other[:3] == ["denied"] * 3, other  # another pool's task on the same host does not
        assert own[:3] == ["allowed"] * 3, own  # the pool's own tasks read them
        # Leaving the pool deletes the group the agent made for it.
        with open(os.path.join(a.root, "pool-group")) as f:  # noqa: ASYNC230
            group = f.read().strip()
        assert grp.getgrnam(group).gr_gid == os.stat(os.path.join(a.root, "certs")).st_gid  # noqa: ASYNC240
        await c.client.pools.delete("pa")
        await c.wait_for(lambda: not _group_exists(group), what=f"group {group} deleted")
        assert int(own[-1]) != 0
        assert int(other[-1]) != 0


START = r"""
import os
d = os.environ['AZ_BATCH_NODE_STARTUP_DIR']
with open(os.path.join(d, 'tool.txt'), 'w') as f:
    f.write('from the start task')
os.chmod(os.path.join(d, 'tool.txt'), 0o640)
"""
# A later task: read what the start task left, then try to change start/ in every way.
WRITE_START = r"""
import os
d = os.environ['AZ_BATCH_NODE_STARTUP_DIR']
res = [open(os.path.join(d, 'tool.txt')).read().replace(' ', '_')]
def attempt(fn):
    try:
        fn(); res.append('allowed')
    except PermissionError:
        res.append('denied')
attempt(lambda: open(os.path.join(d, 'tool.txt'), 'a').write('poison'))
attempt(lambda: open(os.path.join(d, 'planted.sh'), 'w').write('poison'))
attempt(lambda: open(os.path.join(d, 'wd', 'planted.sh'), 'w').write('poison'))
attempt(lambda: os.rename(os.path.join(d, 'tool.txt'), os.path.join(d, 'moved')))
print(' '.join(res), os.getuid(), os.stat(d).st_uid)
"""


async def test_a_later_task_cannot_write_into_the_start_directory(nursery, tmp_path, open_root):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        agent = c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        start = {"commandLine": f'{PY} -c "{START}"', "waitForSuccess": True}
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=1, start_task=start)
        assert (await c.client.tvms.list("p"))[0].start_task_info.exit_code == 0
        out = (await _run_one(c, "wi", "p", "later", f'{PY} -c "{WRITE_START}"')).split()
        assert out[0] == "from_the_start_task"  # the pool's tasks read what the start task left
        assert out[1:5] == ["denied"] * 4, out
        task_uid, start_uid = int(out[5]), int(out[6])
        assert task_uid != start_uid  # the start task's user is never handed to a task
        st = os.stat(os.path.join(agent.root, "start"))  # noqa: ASYNC240
        assert st.st_uid == start_uid != 0
        assert st.st_mode & 0o777 == 0o750


# add_key and keyctl system call numbers
ADD_KEY, KEYCTL = {"aarch64": (217, 219)}.get(platform.machine(), (248, 250))

# The first task leaves secrets in /dev/shm, /tmp (a 0600 file, and one in a directory of its own)
# and /run/lock (world-writable on Debian, as /var/lock), in its user keyring, in System V IPC (a
# 0600 shared memory segment, a semaphore set, a message queue) and in a POSIX message queue.
LEAVE = f"""
ADD_KEY = {ADD_KEY}
import os, subprocess, sys
for p in sys.argv[1:]:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'secret'); os.close(fd)
for kind in ('-M 4096', '-S 1', '-Q'):
    subprocess.run(['ipcmk', *kind.split(), '-p', '0600'], check=True, stdout=subprocess.DEVNULL)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(ADD_KEY, b'user', b'tvm-secret', b'secret', 6, -4) > 0  # add_key(.., @u)
rt = ctypes.CDLL('librt.so.1', use_errno=True)
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
q = rt.mq_open(('/' + os.path.basename(sys.argv[1])).encode(), os.O_CREAT | os.O_WRONLY, 0o600, None)
assert q >= 0 and rt.mq_send(q, b'secret', 6, 0) == 0, ctypes.get_errno()
print('uid', os.getuid())
"""

# READ, plus how many System V IPC objects of its own uid the task finds, whether its user keyring
# holds the key, and whether it opens the POSIX message queue.
READ_IPC = READ.replace(
    "print(' '.join(res), 'uid', os.getuid())",
    f"""KEYCTL = {KEYCTL}
n = 0
for kind in ('shm', 'sem', 'msg'):
    with open('/proc/sysvipc/' + kind) as f:
        head = f.readline().split()
        for line in f:
            n += int(line.split()[head.index('uid')]) == os.getuid()
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
key = libc.syscall(KEYCTL, 10, -4, b'user', b'tvm-secret', 0)  # keyctl(KEYCTL_SEARCH, @u, ..)
rt = ctypes.CDLL('librt.so.1', use_errno=True)
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
mq = rt.mq_open(('/' + os.path.basename(sys.argv[1])).encode(), os.O_RDONLY | os.O_NONBLOCK)
print(' '.join(res), n, 'key' if key > 0 else 'nokey', 'mq' if mq >= 0 else 'nomq', 'uid', os.getuid())""",
)


async def test_the_next_task_of_a_slot_user_does_not_find_what_the_last_one_left(
    nursery, tmp_path, open_root
):
    tag = f"tvm-sec-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    left = [f"/dev/shm/{tag}", f"/tmp/{tag}", f"/tmp/{tag}.d/inner", f"/run/lock/{tag}"]
    os.makedirs(tmp_path / "agents", exist_ok=True)
    try:
        async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
            c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
            await c.pool_with_tvms(
                "p", 1, max_tasks_per_vm=1
            )  # one slot: tasks run one after another
            first = (
                await _run_one(c, "wi", "p", "leave", f'{PY} -c "{LEAVE}" {" ".join(left)}')
            ).split()
            uid = int(first[1])
            # Slot users are a host-wide pool that other agents use too: run readers until one gets
            # the same uid again (the lowest free slot user is taken, so it comes back unless another
            # agent on the host holds it at that moment).
            same, seen = None, []
            for i in range(30):
                out = (
                    await _run_one(
                        c, "wi", "p", f"read{i}", f'{PY} -c "{READ_IPC}" {" ".join(left)}'
                    )
                ).split()
                seen.append(int(out[-1]))
                if seen[-1] == uid:
                    same = out
                    break
            assert same is not None, f"the slot user {uid} never came back: {seen}"
            assert same[:7] == ["absent", "absent", "absent", "absent", "0", "nokey", "nomq"], same
    finally:
        rt = ctypes.CDLL("librt.so.1", use_errno=True)
        rt.mq_unlink(f"/{tag}".encode())  # a queue the sweep missed
        for p in left:
            if os.path.lexists(p):
                os.unlink(p)
        if os.path.isdir(f"/tmp/{tag}.d"):
            os.rmdir(f"/tmp/{tag}.d")


OWNERS = (
    "import os; d = os.environ['AZ_BATCH_TASK_DIR']; "
    "print(os.getuid(), *(os.stat(os.path.join(d, n)).st_uid for n in ('', 'wd', 'stdout.txt', "
    "'stderr.txt')), oct(os.stat(d).st_mode & 0o777))"
)


async def test_a_task_user_owns_its_directory_and_output_files(nursery, tmp_path, open_root):
    """The task directory (from the agent's stock of ready ones, and made by the task itself once
    the stock is used up: 40 tasks on a stock of 32), its wd and its stdout/stderr belong to the
    task's user, 0700; a task user is never root."""
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=2)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", f'{PY} -c "{OWNERS}"') for i in range(40)]
        )
        await c.client.tasks.wait("wi", JOB, timeout=120)
        for i in range(40):
            out = (await c.client.files.get_from_task("wi", JOB, f"t{i}", "stdout.txt")).decode()
            uid, *owners, mode = out.split()
            assert int(uid) != 0, out
            assert owners == [uid] * 4, out
            assert mode == "0o700", out
