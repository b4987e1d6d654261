"""Every YAML and JSON file under deploy/ and docker/ parses, and the compose file, the Prometheus
scrape config and the Grafana provisioning point at files and targets that exist."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DASHBOARD, DEPLOY, DOCKER, json_files, load_docs, yaml_files


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(p.parents[2])))
def test_yaml_parses(path: Path):
    assert load_docs(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", json_files(), ids=lambda p: p.name)
def test_json_parses(path: Path):
    json.loads(path.read_text())


def test_there_are_files_to_check():
    assert len(yaml_files()) >= 10 and DASHBOARD in json_files()


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_and_mounts():
    services = compose()["services"]
    assert {"via-sd", "prometheus", "grafana"} <= set(services)
    build = services["via-sd"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    assert "8000:8000" in services["via-sd"]["ports"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount, not a named volume
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_via_sd_metrics():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["via-sd"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "via-sd:8000" in targets  # the compose service name and port


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian package prometheus)")
def test_promtool_accepts_scrape_config():
    r = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_matches_compose_and_dashboard():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    prom = [d for d in ds if d["type"] == "prometheus"]
    assert prom and prom[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/via-sd.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    mounts = [v.split(":") for v in compose()["services"]["grafana"]["volumes"]]
    assert any(dst.startswith(path + "/") and Path(DOCKER / src).resolve() == DASHBOARD for src, dst, *_ in mounts)
    dash = json.loads(DASHBOARD.read_text())
    # the dashboard's datasource variable defaults to the provisioned datasource's uid
    var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == prom[0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_readme_configuration_table_is_complete():
    """deploy/README.md lists every flag and VIA_SD_* variable of `via-sd serve`, and the pending
    flags the manifests pass."""
    from tests.deploy.conftest import PENDING_SERVE_FLAGS, serve_env_vars, serve_flags

    text = (DEPLOY / "README.md").read_text()
    table = text.split("## Configuration of `via-sd serve`", 1)[1].split("\n## ", 1)[0]
    for name in sorted(serve_flags() | PENDING_SERVE_FLAGS | serve_env_vars()):
        assert f"`{name}`" in table, f"deploy/README.md does not list {name}"
