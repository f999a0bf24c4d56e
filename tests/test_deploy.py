"""deploy/: Kubernetes manifests validated offline against the Kubernetes schemas, Prometheus Operator
resources checked structurally, Prometheus/Alertmanager configurations checked by promtool/amtool, the
sidecar configurations loaded by the sidecar's own settings, the compose stack's references resolved.
No cluster and no Docker engine run here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from monitor.ops import rules
from monitor.sidecar.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in docs() if d["kind"] == kind]


def tool(name: str) -> str:
    return shutil.which(name) or pytest.fail(f"{name} missing: .ci/run installs Debian's prometheus packages")


def test_core_manifests_validate_against_kubernetes_schemas():
    checked = 0
    for _, doc in docs():
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # raises ValidationError with the field
        checked += 1
    assert checked >= 5
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).exists() for r in kustomization["resources"])


def test_a_broken_manifest_is_caught():
    deployment = by_kind("Deployment")[0]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_prometheus_operator_resources_point_at_the_sidecar():
    for kind in CRD_KINDS:
        for doc in by_kind(kind):
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"]
    job_regex = re.compile(re.search(r'job=~"(.*)"', rules.JOB_SELECTOR).group(1))
    for deployment in by_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        pm = by_kind("PodMonitor")[0]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert all(e["port"] in ports for e in pm["spec"]["podMetricsEndpoints"])
        assert all(job_regex.fullmatch(r["replacement"]) for e in pm["spec"]["podMetricsEndpoints"]
                   for r in e["relabelings"] if r["targetLabel"] == "job")
    service = by_kind("Service")[0]
    sm = by_kind("ServiceMonitor")[0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    pod_labels = by_kind("Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind("PrometheusRule")[0]["spec"] == rules.rule_groups()


def test_sidecar_configurations_load(tmp_path, monkeypatch):
    configs = [d["data"]["sidecar.yaml"] for d in by_kind("ConfigMap")]
    configs.append((DEPLOY / "compose" / "sidecar.yaml").read_text())
    kinds = []
    for i, text in enumerate(configs):
        (tmp_path / f"{i}.yaml").write_text(text)
        if "kind: kafka" in text:
            monkeypatch.setenv("LATENTWATCH_SOURCE__KAFKA__SASL_PLAIN_PASSWORD", "s3cret")
        else:
            monkeypatch.delenv("LATENTWATCH_SOURCE__KAFKA__SASL_PLAIN_PASSWORD", raising=False)
        monkeypatch.setenv("LATENTWATCH_AUDIT_KEY", "an-audit-key-from-a-secret")  # the k8s example audits
        settings = load_settings(tmp_path / f"{i}.yaml")
        kinds.append(settings.source.kind)
        if settings.source.kind == "kafka":  # the secret comes from the environment, the rest from the file
            assert settings.source.kafka.sasl_plain_password.get_secret_value() == "s3cret"
            assert settings.source.kafka.bootstrap_servers
    assert sorted(kinds) == ["file", "file", "kafka", "kafka"]


def test_vllm_tap_configurations_load(tmp_path, monkeypatch):
    from collectors.vllm.settings import load_settings as load_tap_settings

    taps = [d["data"]["tap.yaml"] for d in by_kind("ConfigMap") if "tap.yaml" in d["data"]]
    assert taps, "deploy/kubernetes/vllm.yaml configures the vLLM plugin"
    for k in ("LATENTWATCH_VLLM_SINK", "LATENTWATCH_VLLM_SITES", "LATENTWATCH_VLLM_SAMPLE_RATE"):
        monkeypatch.delenv(k, raising=False)
    for i, text in enumerate(taps):
        (tmp_path / f"tap{i}.yaml").write_text(text)
        settings = load_tap_settings(tmp_path / f"tap{i}.yaml")
        assert settings.sink.startswith("file:/signatures/")


@pytest.mark.integration
def test_prometheus_and_alertmanager_configurations(tmp_path):
    shutil.copy(DEPLOY / "prometheus" / "prometheus.yml", tmp_path)
    shutil.copy(ROOT / "alerts" / "latentwatch.rules.yml", tmp_path)
    check = subprocess.run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    am = str(DEPLOY / "alertmanager" / "alertmanager.yml")
    check = subprocess.run([tool("amtool"), "check-config", am], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for labels, receiver in ((["severity=critical", "alertname=LatentwatchConceptDrift"], "pager"),
                             (["severity=warning", "alertname=LatentwatchTapDropping"], "ticket")):
        route = subprocess.run([tool("amtool"), "config", "routes", "test", f"--config.file={am}", *labels],
                               capture_output=True, text=True)
        assert route.stdout.strip() == receiver, route.stdout + route.stderr


def test_compose_stack_references_resolve():
    folder = DEPLOY / "compose"
    stack = yaml.safe_load((folder / "docker-compose.yml").read_text())
    assert {"kafka", "sidecar", "prometheus", "alertmanager", "grafana", "traffic"} <= set(stack["services"])
    for name, service in stack["services"].items():
        if "image" in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        if "build" in service:
            context = (folder / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).exists(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (folder / source).exists(), f"{name}: {source}"
    dashboards = list((ROOT / "dashboards").glob("*.json"))
    assert len(dashboards) == 3
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)
    for service in stack["services"].values():
        if "build" in service:
            assert service["build"].get("target", stages[-1]) in stages
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
