"""The kind test cluster works: two Ready nodes, cluster DNS and pod-to-pod traffic across nodes.

Run (brings the cluster up if needed, idempotent):

    hack/kind/docker-setup.sh && hack/kind/build-base-image.sh && hack/kind/build-node-image.sh
    pytest -m kind tests/kind/test_cluster.py

Skipped only when FINETUNE_SKIP_KIND=1. With FINETUNE_KUBE_CONTEXT set, that context
(in $KUBECONFIG) is used as is and no cluster is created; the workload image
(finetune-local/python-base:bookworm) must then be available to its nodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kind_tools
import pytest

pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(os.environ.get("FINETUNE_SKIP_KIND") == "1", reason="FINETUNE_SKIP_KIND=1"),
]

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "hack" / "kind" / "cluster.sh"
K8S_VERSION = kind_tools.K8S_VERSION
WORKLOAD_IMAGE = "finetune-local/python-base:bookworm"
SERVICE = "peers"
PORT = 8080
TIMEOUT_S = 240


def _run(args: list[str], timeout: float = TIMEOUT_S, input: str | None = None) -> str:
    return kind_tools.run(args, timeout, input)


class Kubectl:
    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        # With a given context, kubectl's own loading rules apply ($KUBECONFIG may be a list).
        self.base = [kind_tools.kubectl_path()]
        if kubeconfig:
            self.base += ["--kubeconfig", kubeconfig]
        if context:
            self.base += ["--context", context]

    def __call__(self, *args: str, timeout: float = TIMEOUT_S, input: str | None = None) -> str:
        return _run([*self.base, *args], timeout=timeout, input=input)

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json"))

    def apply(self, obj: dict, namespace: str) -> None:
        self("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


@pytest.fixture(scope="module")
def kubectl(kube: Any) -> Kubectl:
    # `kube` (conftest.py) brings the cluster up, or does nothing with FINETUNE_KUBE_CONTEXT.
    _run([str(CLUSTER_SH), "load", WORKLOAD_IMAGE], timeout=600)
    context = os.environ.get("FINETUNE_KUBE_CONTEXT")
    kubeconfig = None if context else _run([str(CLUSTER_SH), "kubeconfig"]).strip()
    return Kubectl(kubeconfig, context)


@pytest.fixture()
def namespace(kube: Any, kubectl: Kubectl):
    name = kube.create_namespace("kind-test")
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def _ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_two_nodes_ready(kubectl: Kubectl) -> None:
    kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={TIMEOUT_S}s")
    nodes = kubectl.json("get", "nodes")["items"]
    assert len(nodes) == 2, [n["metadata"]["name"] for n in nodes]
    assert all(_ready(n) for n in nodes)
    control_planes = [
        n for n in nodes if "node-role.kubernetes.io/control-plane" in n["metadata"]["labels"]
    ]
    assert len(control_planes) == 1
    assert all(n["status"]["nodeInfo"]["kubeletVersion"] == K8S_VERSION for n in nodes)


def _peer_pod(name: str, node: str, command: list[str], probe: bool) -> dict:
    container: dict = {
        "name": "main",
        "image": WORKLOAD_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [{"containerPort": PORT, "name": "http"}],
    }
    if probe:
        container["readinessProbe"] = {"tcpSocket": {"port": PORT}, "periodSeconds": 2}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": SERVICE}},
        "spec": {
            "hostname": name,
            "subdomain": SERVICE,
            "nodeName": node,
            "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
        },
    }


# Runs inside pod 1: resolve <pod-0>.<service> through cluster DNS (retrying until the
# deadline, since the headless record appears asynchronously), then GET over TCP.
CLIENT = r"""
import json, socket, sys, time, urllib.request
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
addr, err = None, None
while time.monotonic() < deadline:
    try:
        addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        break
    except OSError as e:
        err = repr(e)
        time.sleep(1)
if addr is None:
    print(json.dumps({"error": "resolve " + host + ": " + str(err)})); sys.exit(1)
with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as r:
    status = r.status
print(json.dumps({"addr": addr, "status": status, "fqdn": socket.getfqdn(host)}))
"""


def test_pod_dns_and_tcp_across_nodes(kubectl: Kubectl, namespace: str) -> None:
    nodes = sorted(
        kubectl.json("get", "nodes")["items"],
        key=lambda n: "node-role.kubernetes.io/control-plane" not in n["metadata"]["labels"],
    )
    assert len(nodes) == 2
    server_node, client_node = (n["metadata"]["name"] for n in nodes)

    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"app": SERVICE},
                "ports": [{"name": "http", "port": PORT}],
            },
        },
        namespace,
    )
    server, client = f"{SERVICE}-0", f"{SERVICE}-1"
    kubectl.apply(
        _peer_pod(server, server_node, ["python3", "-m", "http.server", str(PORT)], probe=True),
        namespace,
    )
    kubectl.apply(
        _peer_pod(
            client, client_node, ["python3", "-c", "import time; time.sleep(86400)"], probe=False
        ),
        namespace,
    )
    kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        f"pod/{server}",
        f"pod/{client}",
        f"--timeout={TIMEOUT_S}s",
    )

    pods = {p["metadata"]["name"]: p for p in kubectl.json("get", "pods", "-n", namespace)["items"]}
    assert pods[server]["spec"]["nodeName"] != pods[client]["spec"]["nodeName"]
    server_ip = pods[server]["status"]["podIP"]

    out = kubectl(
        "exec",
        "-n",
        namespace,
        client,
        "--",
        "python3",
        "-c",
        CLIENT,
        f"{server}.{SERVICE}",
        str(PORT),
        "120",
        timeout=TIMEOUT_S,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result.get("addr") == server_ip, result
    assert result["status"] == 200, result
