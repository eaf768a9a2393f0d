"""The `[provisioner]` section's schemas: every mistake is refused with a message naming the
provisioner and the key, and a valid section comes back typed."""

from __future__ import annotations

import pytest

from coordinator.runtime.provisioners.config import (
    K8sSpec,
    ProvisionerConfigError,
    SlurmSpec,
    SshSpec,
    parse_provisioners,
    slurm_time,
)

HOST = {"address": "10.0.0.5", "tvm": "/opt/tvm/bin/tvm", "key-file": "/etc/tvm/id"}


def ssh(**kw: object) -> dict:
    return {"lab": {"type": "ssh", "hosts": [HOST], **kw}}


def slurm(**kw: object) -> dict:
    return {"hpc": {"type": "slurm", "work-dir": "/shared/tvm", **kw}}


def test_a_valid_section_is_typed_and_keeps_its_default():
    cfg = parse_provisioners(
        {
            "default": "lab",
            **ssh(),
            **slurm(partition="batch", account="proj-1", **{"time-limit": "PT2H"}),
            "kube": {"type": "kubernetes", "namespace": "batch", "replicas": 3},
        },
        "coord.toml",
    )
    assert cfg.default == "lab"
    lab, hpc, kube = cfg.named["lab"], cfg.named["hpc"], cfg.named["kube"]
    assert isinstance(lab, SshSpec)
    assert lab.hosts[0].port == 22
    assert lab.hosts[0].user == "root"
    assert isinstance(hpc, SlurmSpec)
    assert slurm_time(hpc.time_limit) == 120
    assert isinstance(kube, K8sSpec)
    assert kube.replicas == 3
    assert parse_provisioners({}).named == {}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"lab": {"hosts": [HOST]}}, "[provisioner.lab]: `type` must be one of"),
        ({"lab": {"type": "docker"}}, "got 'docker'"),
        ({"lab": "ssh"}, "[provisioner.lab]: must be a table"),
        ({"bad name": {"type": "ssh"}}, "a provisioner name is 1-32"),
        ({"a-b": {"type": "ssh"}}, "agents it starts are named `<name>-...`"),
        ({"local": {"type": "ssh"}}, "(not local)"),
        ({"lab": {"type": "ssh"}}, "missing key `hosts`"),
        (ssh(hosts=[]), "`hosts` must list at least one host"),
        (ssh(hostz=1), "unknown key `hostz`"),
        (ssh(hosts=[{**HOST, "prot": 22}]), "unknown key `prot` in `hosts[0]`"),
        (ssh(hosts=[{**HOST, "port": "22"}]), "`hosts[0].port`: Expected `int`, got `str`"),
        (ssh(hosts=[{**HOST, "port": 70000}]), "hosts[0] (10.0.0.5): `port` must be in 1..65535"),
        (ssh(hosts=[{"address": "h"}]), "give exactly one of `tvm`"),
        (ssh(hosts=[{**HOST, "venv": "/opt/v"}]), "give exactly one of `tvm`"),
        (ssh(hosts=[{**HOST, "tvm": "tvm; rm -rf /"}]), "`tvm` must be an absolute path"),
        (ssh(hosts=[{**HOST, "address": "a b"}]), "`address` is not a host name"),
        (ssh(hosts=[{**HOST, "user": "-oProxyCommand=x"}]), None),
        (ssh(hosts=[{**HOST, "user": "-oX"}]), None),
        (ssh(hosts=[{**HOST, "address": "-oX"}]), "`address` is not a host name"),
        (ssh(hosts=[{**HOST, "max-agents": 0}]), "`max-agents` must be at least 1"),
        # pip options are no requirement: `-r FILE` would read a file, `--index-url` redirect
        (ssh(hosts=[{"address": "h", "venv": "/v", "pip-spec": "-r/etc/x"}]), "`pip-spec` is not"),
        (ssh(hosts=[{"address": "h", "venv": "/v", "pip-spec": "--pre"}]), "`pip-spec` is not"),
        (ssh(hosts=[{"address": "h", "venv": "/v", "pip-spec": "src/tvm"}]), "`pip-spec` is not"),
        (ssh(hosts=[{"address": "h", "venv": "/v", "pip-spec": "/a b"}]), "`pip-spec` is not"),
        (ssh(hosts=[{"address": "h", "venv": "/v", "python": "py;x"}]), "`python` must be"),
        (ssh(**{"install-timeout": 0}), "`install-timeout` must be positive"),
        (ssh(hosts=[{**HOST, "mode": "docker"}]), "`hosts[0].mode`"),
        (ssh(**{"idle-stop-after": 0}), "`idle-stop-after` must be positive"),
        (ssh(**{"coordinator-url": "ftp://x"}), "`coordinator-url` is not"),
        ({"hpc": {"type": "slurm"}}, "`work-dir` is required"),
        (slurm(**{"work-dir": "relative/dir"}), "`work-dir` must be an absolute path"),
        (slurm(**{"time-limit": "1h"}), "`time-limit` must be at least 2 minutes"),
        (slurm(**{"time-limit": "00:01:00"}), "`time-limit` must be at least 2 minutes"),
        (slurm(partition="a;b"), "`partition` is not a Slurm name"),
        (slurm(**{"max-pending": 0}), "`max-pending` must be at least 1"),
        (slurm(**{"max-failures": 0}), "`max-failures` must be at least 1"),
        (slurm(**{"extra-args": ["-p x"]}), "`extra-args` holds sbatch options"),
        ({"k": {"type": "kubernetes", "namespace": "Bad_NS"}}, "`namespace` is not"),
        ({"k": {"type": "kubernetes", "replicas": -1}}, "`replicas` must be 0 or more"),
        ({"default": "nope", **ssh()}, "`provisioner.default` names 'nope', which is not defined"),
        ({"default": 3}, "`provisioner.default` must be a provisioner name"),
    ],
)
def test_mistakes_are_refused_naming_the_provisioner_and_key(table, expected):
    if expected is None:  # a user name that would be an ssh option
        expected = "`user` is not a user name"
    with pytest.raises(ProvisionerConfigError) as info:
        parse_provisioners(table, "coord.toml")
    message = str(info.value)
    assert message.startswith("coord.toml: ")
    assert expected in message


def test_ssh_venv_entries_take_a_requirement_or_a_path_and_a_python():
    for spec in ("tvm-batch", "tvm-batch==0.1.0", "tvm-batch[postgres]>=0.1", "/src/tvm-batch"):
        host = {"address": "h", "venv": "/opt/v", "pip-spec": spec, "python": "/usr/bin/python3.12"}
        lab = parse_provisioners({"lab": {"type": "ssh", "hosts": [host]}}).named["lab"]
        assert isinstance(lab, SshSpec)
        assert (lab.hosts[0].pip_spec, lab.hosts[0].python) == (spec, "/usr/bin/python3.12")


def test_slurm_time_limits():
    assert slurm_time("PT1H30M") == 90
    assert slurm_time("1-00:00:00") == 24 * 60
    assert slurm_time("02:30") == 150
    assert slurm_time("45") == 45
    for bad in ("", "PT1M", "soon", "-PT1H"):
        with pytest.raises(ProvisionerConfigError):
            slurm_time(bad)


def test_ssh_takes_back_only_names_of_its_own_hosts(tmp_path):
    from coordinator.runtime.provisioners.ssh import SshProvisioner

    spec = parse_provisioners(ssh()).named["lab"]
    prov = SshProvisioner("lab", spec, str(tmp_path), "ws://c:1/agent", "t")  # type: ignore[arg-type]
    assert prov.adopt("lab-0-0badcafe")
    assert prov.agents == {"lab-0-0badcafe": 0}
    for other in ("lab-1-0badcafe", "lab-x-1", "lab-0", "lab-0-a-b"):
        assert not prov.adopt(other)


@pytest.mark.parametrize("mode", ["auto", "process", "systemd"])
@pytest.mark.parametrize("install", [{"tvm": "/opt/tvm/bin/tvm"}, {"venv": "/opt/tvm"}])
def test_ssh_scripts_are_valid_shell_and_carry_no_token(tmp_path, mode, install):
    import subprocess

    from coordinator.runtime.provisioners.ssh import SshProvisioner

    host = {"address": "h", "agent-dir": "/var/lib/tvm-ssh", "mode": mode}
    spec = parse_provisioners({"lab": {"type": "ssh", "hosts": [{**host, **install}]}}).named["lab"]
    prov = SshProvisioner("lab", spec, str(tmp_path), "ws://c:1/agent", "s3cret-token")  # type: ignore[arg-type]
    h = spec.hosts[0]  # type: ignore[union-attr]
    from coordinator.runtime.provisioners.ssh import _venv_script

    scripts = [prov._start_script(h, "lab-0-ab"), prov._stop_script(h, "lab-0-ab")]
    if h.venv:
        scripts.append(_venv_script(h, 900))
    for script in scripts:
        assert "s3cret" not in script
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    start = prov._start_script(h, "lab-0-ab")
    assert "cat > /var/lib/tvm-ssh/lab-0-ab/token" in start  # the token comes on stdin
    assert ("systemd-run" in start) == (mode != "process")
    # the venv is made in a step of its own, which never reads stdin (the start step's token)
    assert "python3 -m venv" not in start
    if h.venv:
        venv = _venv_script(h, 900)
        assert "python3 -m venv /opt/tvm </dev/null" in venv
        assert "pip install" in venv
        assert "</dev/null" in venv.split("pip install", 1)[1].split("\n", 1)[0]
    args = prov._ssh_args(h)
    assert args[-1] == "root@h"
    assert "BatchMode=yes" in args
