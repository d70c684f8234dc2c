"""The Kubernetes manifests (deploy/k8s): every kustomization renders offline with kubectl's own kustomize; built-in
kinds validate strictly against the Kubernetes schemas (kubernetes-validate), the LeaderWorkerSet and the
ServiceMonitor against their CRDs' schemas (deploy/k8s/schemas, unknown fields refused); and what they wire
together agrees (selectors, ports, probes, the HPA's metric, the entrypoint's variables)."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.37.0"
CUSTOM = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
          ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json"}


def render(name: str) -> list[dict]:
    kubectl = pathlib.Path(sys.executable).parent / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def strict(schema):
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM:
        schema = strict(json.loads((K8S / "schemas" / CUSTOM[key]).read_text()))
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


KUSTOMIZATIONS = ["single-node", "multi-node", "prometheus-adapter"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_and_validates_strictly(name):
    docs = render(name)
    assert docs
    for doc in docs:
        validate(doc)


def test_the_strict_check_refuses_a_misspelt_field():
    lws = next(d for d in render("multi-node") if d["kind"] == "LeaderWorkerSet")
    lws["spec"]["leaderWorkerTemplate"]["restartPolicys"] = "RecreateGroupOnPodRestart"
    with pytest.raises(jsonschema.ValidationError, match="restartPolicys"):
        validate(lws)
    deployment = next(d for d in render("single-node") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def by_kind(docs):
    return {d["kind"]: d for d in docs}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_server_container(container: dict, drain_s: int, grace_s: int) -> None:
    assert grace_s > drain_s
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/v2/models/ensemble/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {k: ports[k] for k in ("http", "grpc", "metrics", "api")} == \
        {"http": 8000, "grpc": 8001, "metrics": 8002, "api": 9000}


def env_of(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_single_node_wires_probes_shm_service_budget_monitor_and_autoscaler():
    docs = by_kind(render("single-node"))
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    check_server_container(container, int(env_of(container)["DRAIN_TIMEOUT_S"]),
                           pod["spec"]["terminationGracePeriodSeconds"])
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    labels = pod["metadata"]["labels"]
    assert matches(docs["Service"]["spec"]["selector"], labels)
    assert matches(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    assert matches(docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"], docs["Service"]["metadata"]["labels"])
    assert {e["port"] for e in docs["ServiceMonitor"]["spec"]["endpoints"]} <= \
        {p["name"] for p in docs["Service"]["spec"]["ports"]}
    check_autoscaler(docs["HorizontalPodAutoscaler"], "Deployment", docs["Deployment"]["metadata"]["name"])


def check_autoscaler(hpa: dict, kind: str, name: str) -> None:
    assert hpa["spec"]["scaleTargetRef"]["kind"] == kind and hpa["spec"]["scaleTargetRef"]["name"] == name
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    # the engine's own queue, exported on the metrics port, and the rule that gives it to the HPA
    assert f'"{metric}"' in (ROOT / "triton_backend" / "serving" / "metrics.py").read_text()
    rules = yaml.safe_load(render("prometheus-adapter")[0]["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == metric and metric in r["seriesQuery"] for r in rules)


def test_multi_node_leader_is_node_0_and_the_service_selects_leaders_only():
    docs = by_kind(render("multi-node"))
    lws = docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert lws["restartPolicy"] == "RecreateGroupOnPodRestart"  # a lost node ends the job: recreate the group
    leader, worker = lws["leaderTemplate"], lws["workerTemplate"]
    container = leader["spec"]["containers"][0]
    env = env_of(container)
    check_server_container(container, int(env["DRAIN_TIMEOUT_S"]), leader["spec"]["terminationGracePeriodSeconds"])
    worker_container = worker["spec"]["containers"][0]
    assert env_of(worker_container) == env  # every node started with the same configuration
    assert "readinessProbe" not in worker_container and "ports" not in worker_container
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["TP"]) * int(env["PP"]) == gpus * lws["size"]  # one rank per GPU of the group
    service = docs["Service"]["spec"]["selector"]
    assert matches(service, {**leader["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": "megatron-triton"})
    assert not matches(service, {**worker["metadata"]["labels"],
                                 "leaderworkerset.sigs.k8s.io/name": "megatron-triton"})
    check_autoscaler(docs["HorizontalPodAutoscaler"], "LeaderWorkerSet", docs["LeaderWorkerSet"]["metadata"]["name"])


def test_the_entrypoint_maps_leaderworkerset_variables_to_the_jobs(tmp_path):
    """The mapping lines of docker/entrypoint.sh, run with LeaderWorkerSet's variables."""
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    block = re.search(r'if \[ -n "\$\{LWS_LEADER_ADDRESS:-\}" \]; then\n.*?\nfi\n', script, re.S).group(0)
    run = subprocess.run(["bash", "-c", block + 'echo "$MASTER_ADDR $NODE_RANK $NNODES"'], capture_output=True,
                         text=True, env={"LWS_LEADER_ADDRESS": "lws-0.lws", "LWS_WORKER_INDEX": "1",
                                         "LWS_GROUP_SIZE": "2", "PATH": "/usr/bin:/bin"})
    assert run.stdout.split() == ["lws-0.lws", "1", "2"]
