"""The Kubernetes manifests under deploy/kubernetes: built-in kinds validate offline against the
Kubernetes JSON schemas bundled in `kubernetes-validate` (strict: unknown fields fail); the custom
resources (ServiceMonitor, PodMonitor, LeaderWorkerSet) are checked structurally, and the pod
templates inside a LeaderWorkerSet are validated as PodTemplates. Then the pieces have to agree:
selectors and labels, probes on /health, the flags and VIA_SD_* variables that `via-sd serve` has,
and the autoscaler's metric and the prometheus-adapter rule."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.conftest import (
    KUBERNETES,
    PENDING_SERVE_FLAGS,
    adapter_rules,
    flags_in,
    kubernetes_docs,
    serve_env_vars,
    serve_flags,
)

KUBERNETES_VERSION = "1.33"
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "LeaderWorkerSet", "Kustomization"}
VARIANTS = ("cpu", "gpu", "multinode")

DOCS = kubernetes_docs()


def _id(item) -> str:
    path, doc = item
    return f"{path.parent.name}/{path.name}:{doc.get('kind')}"


def by_kind(kind: str, variant: str | None = None) -> list[dict]:
    return [d for p, d in DOCS if d.get("kind") == kind and (variant is None or p.parent.name == variant)]


def validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    kv.validate(doc, KUBERNETES_VERSION, strict=True)


def pod_templates() -> list[tuple[str, dict]]:
    """(owner name, pod template) for every Deployment and both templates of a LeaderWorkerSet."""
    out = [(d["metadata"]["name"], d["spec"]["template"]) for d in by_kind("Deployment")]
    for lws in by_kind("LeaderWorkerSet"):
        t = lws["spec"]["leaderWorkerTemplate"]
        out += [(lws["metadata"]["name"] + "/leader", t["leaderTemplate"]),
                (lws["metadata"]["name"] + "/worker", t["workerTemplate"])]
    return out


def serving_containers() -> list[tuple[str, dict, str]]:
    """(owner, container, command line) for every container that runs `via-sd serve`."""
    out = []
    for owner, tpl in pod_templates():
        for c in tpl["spec"]["containers"]:
            line = " ".join(c.get("command", []) + c.get("args", []))
            if (c.get("command", [])[:2] == ["via-sd", "serve"]) or re.search(r"\bvia-sd\s+serve\b", line):
                out.append((owner, c, line))
    return out


@pytest.mark.parametrize("item", [i for i in DOCS if i[1].get("kind") not in CUSTOM_KINDS], ids=_id)
def test_builtin_kinds_validate_against_schema(item):
    validate(item[1])


def test_strict_validation_catches_unknown_fields():
    doc = yaml.safe_load((KUBERNETES / "cpu" / "service.yaml").read_text())
    doc["spec"]["portz"] = []
    kv = pytest.importorskip("kubernetes_validate")
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kustomization_lists_every_manifest(variant):
    folder = KUBERNETES / variant
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_leaderworkerset_structure_and_templates():
    (lws,) = by_kind("LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    assert set(spec) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
    t = spec["leaderWorkerTemplate"]
    assert set(t) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy"}
    assert isinstance(t["size"], int) and t["size"] >= 2
    assert t["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
    for role in ("leaderTemplate", "workerTemplate"):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"lws-{role.lower()}"},
                  "template": t[role]})
    # workers join the Ray head that the leader starts
    worker_cmd = " ".join(sum((c.get("command", []) + c.get("args", []) for c in t["workerTemplate"]["spec"]["containers"]), []))
    leader_cmd = " ".join(sum((c.get("command", []) + c.get("args", []) for c in t["leaderTemplate"]["spec"]["containers"]), []))
    assert "ray start --head --port=6379" in leader_cmd
    assert "$LWS_LEADER_ADDRESS:6379" in worker_cmd


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitors_structure(kind):
    docs = by_kind(kind)
    assert docs or kind == "PodMonitor"
    endpoints_key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    for doc in docs:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc["spec"]) <= {"selector", endpoints_key, "namespaceSelector", "jobLabel", "podTargetLabels"}
        assert doc["spec"]["selector"]["matchLabels"]
        for ep in doc["spec"][endpoints_key]:
            assert ep["port"] == "http" and ep["path"] == "/metrics"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_reach_pods_with_an_http_port():
    pods = [(tpl["metadata"]["labels"], {p.get("name") for c in tpl["spec"]["containers"] for p in c.get("ports", [])})
            for _, tpl in pod_templates()]
    for d in by_kind("Deployment"):
        assert _matches(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
    for svc in by_kind("Service"):
        hits = [ports for labels, ports in pods if _matches(svc["spec"]["selector"], labels)]
        assert hits, f"Service {svc['metadata']['name']} selects no pod"
        assert all("http" in ports for ports in hits), f"Service {svc['metadata']['name']} reaches a pod without port http"
    for sm in by_kind("ServiceMonitor"):
        assert any(_matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in by_kind("Service"))
    for pm in by_kind("PodMonitor"):
        hits = [ports for labels, ports in pods if _matches(pm["spec"]["selector"]["matchLabels"], labels)]
        assert hits and all("http" in ports for ports in hits)


def test_serving_containers_probe_health():
    containers = serving_containers()
    assert len(containers) == 3  # cpu, gpu, multinode leader
    for owner, c, _ in containers:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", f"{owner}: {probe}"
            assert c[probe]["httpGet"]["port"] == "http"
        assert c["ports"][0]["containerPort"] == 8000


def _env_of(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for ref in container.get("envFrom", []):
        cm = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == ref["configMapRef"]["name"])
        names |= set(cm["data"])
    return names


def test_serve_flags_exist():
    known = serve_flags()
    for owner, _, line in serving_containers():
        unknown = flags_in(line.split("serve", 1)[1]) - known
        assert unknown <= PENDING_SERVE_FLAGS, f"{owner} passes {sorted(unknown)}, which `via-sd serve` does not have"


def test_pending_serve_flags_are_still_missing():
    """Fails once serve.py grows a pending flag, as a reminder to drop it from PENDING_SERVE_FLAGS."""
    assert not (PENDING_SERVE_FLAGS & serve_flags())


def test_env_vars_are_read_by_the_server_or_by_the_manifest():
    read = serve_env_vars()
    assert {"VIA_SD_MODEL", "VIA_SD_HOST", "VIA_SD_PORT", "VIA_SD_SPEC_MODE", "VIA_SD_DRAFTER", "VIA_SD_API_KEY"} <= read
    for owner, c, line in serving_containers():
        for name in _env_of(c):
            if name.startswith("VIA_SD_") and name not in read:
                assert f"$({name})" in line or f"${name}" in line or f"${{{name}}}" in line, (
                    f"{owner} sets {name}, which nothing reads")


def test_tensor_parallel_size_matches_gpus():
    for owner, c, line in serving_containers():
        if "--backend=vllm" not in line and "--backend vllm" not in line:
            continue
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        cm = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == c["envFrom"][0]["configMapRef"]["name"])
        tp = int(cm["data"]["VIA_SD_TENSOR_PARALLEL_SIZE"])
        pp = int(cm["data"].get("VIA_SD_PIPELINE_PARALLEL_SIZE", 1))
        nodes = next((lws["spec"]["leaderWorkerTemplate"]["size"] for lws in by_kind("LeaderWorkerSet")
                      if owner.startswith(lws["metadata"]["name"])), 1)
        assert tp * pp == gpus * nodes, f"{owner}: TP {tp} x PP {pp} != {gpus} GPUs x {nodes} nodes"


def test_hpa_scales_its_deployment_on_an_adapter_metric():
    served = {r["name"]["as"] for r in adapter_rules()}
    deployments = {d["metadata"]["name"] for d in by_kind("Deployment")}
    hpas = by_kind("HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == deployments
    for h in hpas:
        for m in h["spec"]["metrics"]:
            assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in served
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]


def test_adapter_rules_shape():
    for rule in adapter_rules():
        assert re.fullmatch(r"via_sd_[a-z_]+\{.*\}", rule["seriesQuery"])
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert re.search(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_termination_grace_outlasts_shutdown_grace():
    for owner, c, line in serving_containers():
        m = re.search(r"--shutdown-grace-s[= ](\d+)", line)
        grace = float(m.group(1)) if m else 30.0
        tpl = next(t for o, t in pod_templates() if o == owner)
        assert tpl["spec"].get("terminationGracePeriodSeconds", 30) > grace, owner
