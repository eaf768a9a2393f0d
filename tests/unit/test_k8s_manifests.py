"""`tvm k8s manifests`: the generated Secret and StatefulSet/Job, parsed back and checked (no
cluster here: the content is what can be shown)."""

from __future__ import annotations

import base64
import json

from click.testing import CliRunner

from coordinator.cli.main import cli
from coordinator.runtime.provisioners.config import K8sSpec
from coordinator.runtime.provisioners.k8s import manifests

TOKEN = "tvmjt.abc.s3cret"


def _by_kind(doc: dict) -> dict:
    assert doc["apiVersion"] == "v1"
    assert doc["kind"] == "List"
    return {item["kind"]: item for item in doc["items"]}


def test_statefulset_mounts_the_token_from_a_secret_and_keeps_state_per_pod():
    spec = K8sSpec(type="kubernetes", namespace="batch", image="reg/tvm:1", replicas=3)
    items = _by_kind(
        manifests("gpu", spec, "https://batch.example:7070", TOKEN, cores=4, memory_mib=7168)
    )
    secret, sts = items["Secret"], items["StatefulSet"]
    assert base64.b64decode(secret["data"]["join-token"]).decode() == TOKEN
    assert secret["metadata"]["namespace"] == "batch"
    assert sts["spec"]["replicas"] == 3
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "reg/tvm:1"
    cmd = container["command"]
    assert cmd[:4] == ["tvm", "agent", "--coordinator", "wss://batch.example:7070/agent"]
    token_path = cmd[cmd.index("--token-file") + 1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert token_path.rsplit("/", 1)[0] in mounts
    assert mounts[token_path.rsplit("/", 1)[0]]["readOnly"] is True
    secret_volume = next(v for v in pod["volumes"] if "secret" in v)
    assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert secret_volume["secret"]["defaultMode"] == 0o400
    # the token is nowhere but in the Secret
    text = json.dumps(sts)
    assert TOKEN not in text
    assert "s3cret" not in text
    assert container["env"][0]["name"] == "TVM_AGENT_NAME"
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "7168Mi"}
    assert pod["automountServiceAccountToken"] is False
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert sts["spec"]["selector"]["matchLabels"] == sts["spec"]["template"]["metadata"]["labels"]


def test_jobs_kind_uses_scratch_state_and_never_restarts():
    spec = K8sSpec(type="kubernetes", kind="Job", replicas=2)
    job = _by_kind(manifests("a", spec, "http://c:7070", TOKEN))["Job"]
    assert job["apiVersion"] == "batch/v1"
    assert job["spec"]["parallelism"] == 2
    assert job["spec"]["completions"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert {"name": "state", "emptyDir": {}} in pod["volumes"]


def test_cli_prints_manifests_from_the_coordinator_config(tmp_path):
    conf = tmp_path / "coord.toml"
    conf.write_text(
        '[provisioner.kube]\ntype = "kubernetes"\nnamespace = "tvm"\nreplicas = 2\n'
        'coordinator-url = "http://10.1.2.3:7070"\n'
    )
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "k8s",
            "manifests",
            "--config",
            str(conf),
            "--token-file",
            str(token),
            "--vm-size",
            "medium",
        ],
    )
    assert res.exit_code == 0, res.output
    items = _by_kind(json.loads(res.output))
    sts = items["StatefulSet"]
    assert sts["metadata"]["namespace"] == "tvm"
    assert sts["spec"]["replicas"] == 2
    assert "ws://10.1.2.3:7070/agent" in sts["spec"]["template"]["spec"]["containers"][0]["command"]
    # mistakes are named
    res = runner.invoke(
        cli, ["k8s", "manifests", "--coordinator", "http://c:1"], env={"TVM_JOIN_TOKEN": ""}
    )
    assert res.exit_code != 0
    assert "--token-file" in res.output
    res = runner.invoke(
        cli, ["k8s", "manifests", "--token-file", str(token), "--coordinator", "ftp://x"]
    )
    assert res.exit_code != 0
    assert "must start with ws://" in res.output
    conf.write_text('[provisioner.kube]\ntype = "kubernetes"\nreplicas = -1\n')
    res = runner.invoke(
        cli, ["k8s", "manifests", "--config", str(conf), "--token-file", str(token)]
    )
    assert res.exit_code != 0
    assert "[provisioner.kube]: `replicas` must be 0 or more" in res.output
