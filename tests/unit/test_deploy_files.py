"""deploy/: the generated dashboard is current, and the compose, Prometheus, Grafana-provisioning
and Kubernetes files are valid and agree with each other.

No Docker engine or Kubernetes cluster runs here: the compose file is checked against the
Compose specification's JSON schema shipped in Debian's docker-compose package, and
Prometheus's config with Debian's ``promtool`` (both unpacked by scripts/fetch_prometheus.sh);
where a ``docker compose`` (v2) command exists, its ``config`` runs too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS = Path(os.environ.get("KVEVICT_TOOLS_DIR", Path.home() / ".cache/vllm-kvevict/tools"))
COMPOSE_SCHEMA = TOOLS / "docker-compose/usr/lib/python3/dist-packages/compose/config/compose_spec.json"
PROMTOOL = TOOLS / "prometheus/usr/bin/promtool"

sys.path.insert(0, str(DEPLOY / "grafana"))
import dashboard as grafana_dashboard  # noqa: E402  (deploy/grafana/dashboard.py)


def tool(path: Path) -> Path:
    if not path.exists():
        subprocess.run(["bash", str(ROOT / "scripts/fetch_prometheus.sh")], check=False)
    if not path.exists():
        if shutil.which("apt-get") is None:
            pytest.skip(f"{path.name}: no apt-get to fetch Debian's package (scripts/fetch_prometheus.sh)")
        pytest.fail(f"{path} missing after scripts/fetch_prometheus.sh")
    return path


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_generated_dashboard_files_are_current():
    pytest.importorskip("grafana_foundation_sdk")
    assert grafana_dashboard.main(["--check"]) == 0, "run: python deploy/grafana/dashboard.py"


def test_dashboard_panels_and_queries():
    board = json.loads(grafana_dashboard.DASHBOARD_JSON.read_text())
    assert board["uid"] == grafana_dashboard.UID
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs == [e for _, e in grafana_dashboard.queries()]
    assert any("vllm:kv_cache_usage_perc" in e for e in exprs)  # vLLM's own panels next to ours
    for needle in ("kvevict_bytes_returned_total", "kvevict_compression_ratio", "kvevict_eviction_seconds",
                   "kvevict_requests_total", "kvevict_cache_blocks", "kvevict_last_head_kept_tokens"):  # fmt: skip
        assert any(needle in e for e in exprs), needle
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and p["datasource"]["uid"] == grafana_dashboard.DATASOURCE_UID


def test_compose_file_against_the_compose_schema():
    jsonschema = pytest.importorskip("jsonschema")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    schema = json.loads(tool(COMPOSE_SCHEMA).read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert {"vllm", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_prometheus_config_passes_promtool():
    done = subprocess.run([str(tool(PROMTOOL)), "check", "config", str(DEPLOY / "prometheus/prometheus.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "vllm:8000" in targets  # the compose service


def test_grafana_provisioning():
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [d["uid"] for d in sources["datasources"]] == [grafana_dashboard.DATASOURCE_UID]
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/vllm-kvevict.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_kubernetes_manifests():
    k8s = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    docs = {}
    for name in [*kustomization["resources"], "servicemonitor.yaml"]:
        for doc in load_all(k8s / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
            docs[doc["kind"]] = doc
    assert set(docs) == {"Deployment", "Service", "ConfigMap", "ServiceMonitor"}
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    container = pod["spec"]["containers"][0]
    assert any(a.startswith("--kv-eviction") for a in container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] in port_names
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    configmap = docs["ConfigMap"]
    assert configmap["data"]["vllm-kvevict.json"] == grafana_dashboard.DASHBOARD_JSON.read_text()


def test_cpu_image_runs_the_readme_setup():
    dockerfile = (DEPLOY / "Dockerfile.cpu").read_text()
    readme = (ROOT / "README.md").read_text()
    # The README's main job (scripts/run.sh) starts with the same set-up the image runs.
    assert "RUN bash scripts/setup.sh" in dockerfile and "bash scripts/run.sh" in readme
    assert 'bash "$ROOT/scripts/setup.sh"' in (ROOT / "scripts/run.sh").read_text()
    assert "--kv-eviction" in dockerfile
    gpu = (ROOT / "Dockerfile").read_text()
    assert "FROM ${VLLM_IMAGE}" in gpu and "vllm/vllm-openai:v0.32.0" in gpu
