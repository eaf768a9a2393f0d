"""Kubernetes manifests for agents as pods (`tvm k8s manifests`): the join token in a Secret
mounted read-only into the pod (never in an environment variable or command line), and either a
StatefulSet (stable agent ids and a volume per pod for the agent's credential and TVM root) or a
Job (one-off agents on scratch space). Generation only; `kubectl apply -f` takes the output (JSON
is YAML)."""

from __future__ import annotations

import base64
from typing import Any

from .config import K8sSpec

TOKEN_DIR = "/var/run/tvm-agent"
STATE_DIR = "/var/lib/tvm-agent"


def manifests(
    name: str,
    spec: K8sSpec,
    coordinator_url: str,
    token: str,
    *,
    cores: int = 1,
    memory_mib: int = 1792,
    disk_gib: int = 0,
) -> dict[str, Any]:
    """A `v1 List` of the Secret and the StatefulSet or Job for provisioner `name`."""
    app = f"tvm-agent-{name}".lower()
    labels = {"app.kubernetes.io/name": "tvm-agent", "app.kubernetes.io/instance": app}
    secret_name = f"{app}-join-token"
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name, "namespace": spec.namespace, "labels": labels},
        "type": "Opaque",
        "data": {"join-token": base64.b64encode(token.encode()).decode()},
    }
    ws = coordinator_url.rstrip("/").replace("https://", "wss://").replace("http://", "ws://")
    if not ws.endswith("/agent"):
        ws += "/agent"
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image,
        "command": [
            "tvm",
            "agent",
            "--coordinator",
            ws,
            "--token-file",
            f"{TOKEN_DIR}/join-token",
            "--root",
            f"{STATE_DIR}/root",
            "--private-dir",
            f"{STATE_DIR}/private",
        ],
        # the pod's name is the agent id: a StatefulSet's pods keep theirs across restarts
        "env": [
            {"name": "TVM_AGENT_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ],
        "resources": {
            "requests": {"cpu": str(cores), "memory": f"{memory_mib}Mi"},
            "limits": {"cpu": str(cores), "memory": f"{memory_mib}Mi"},
        },
        # root in the pod: the agent runs each task as its own unprivileged user
        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": True},
        "volumeMounts": [
            {"name": "join-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {
                "name": "join-token",
                "secret": {"secretName": secret_name, "defaultMode": 0o400},
            }
        ],
        "terminationGracePeriodSeconds": 70,  # the agent's drain grace (60 s) and a margin
        "automountServiceAccountToken": False,  # tasks must not reach the cluster's API
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    template = {"metadata": {"labels": labels}, "spec": pod_spec}
    workload: dict[str, Any]
    if spec.kind == "StatefulSet":
        storage = f"{max(1, disk_gib)}Gi"
        workload = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": app, "namespace": spec.namespace, "labels": labels},
            "spec": {
                "serviceName": app,
                "replicas": spec.replicas,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": labels},
                "template": template,
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "state"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": storage}},
                        },
                    }
                ],
            },
        }
    else:
        pod_spec["restartPolicy"] = "Never"
        pod_spec["volumes"].append({"name": "state", "emptyDir": {}})
        workload = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": app, "namespace": spec.namespace, "labels": labels},
            "spec": {
                "parallelism": spec.replicas,
                "completions": spec.replicas,
                "backoffLimit": 3,
                "template": template,
            },
        }
    return {"apiVersion": "v1", "kind": "List", "items": [secret, workload]}
