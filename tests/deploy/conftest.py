"""Helpers for the deployment tests: the files under deploy/ and docker/, the metric names they
query, and the flags and environment variables of `via-sd serve` that they pass."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "via-sd-dashboard.json"
ADAPTER_VALUES = DEPLOY / "prometheus" / "adapter-values.yaml"

# Flags the manifests pass that `via-sd serve` does not have yet; each has the VIA_SD_* variable
# of the same name in the manifests' ConfigMaps. Remove a name here once serve.py defines it.
PENDING_SERVE_FLAGS: set[str] = set()

# a metric name in PromQL: ours all start with via_sd_ or with vLLM's vllm: prefix
METRIC_RE = re.compile(r"\b(via_sd_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
SELECTOR_RE = re.compile(r"\b(via_sd_[a-z0-9_]+|vllm:[a-z0-9_:]+)\{([^}]*)\}")


def yaml_files() -> list[Path]:
    return sorted(p for d in (DEPLOY, DOCKER) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def json_files() -> list[Path]:
    return sorted(p for d in (DEPLOY, DOCKER) for p in d.rglob("*.json"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubernetes_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERNETES.rglob("*.yaml")) for d in load_docs(p)]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict) and "query" in q:
            exprs.append(q["query"])
    return exprs


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    """(metric, label, value) for every `label="value"` equality matcher on one of our metrics;
    matchers with Grafana variables (`$job`) are left out."""
    out = []
    for metric, body in SELECTOR_RE.findall(expr):
        for m in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"', body):
            if m.group(2) == "=" and "$" not in m.group(3):
                out.append((metric, m.group(1), m.group(3)))
    return out


def serve_flags() -> set[str]:
    from server.gateway.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def serve_env_vars() -> set[str]:
    """The VIA_SD_* variables the server reads (serve.py, and the model cache in model_files.py)."""
    names: set[str] = set()
    for rel in ("server/gateway/serve.py", "server/engine/model_files.py"):
        names |= set(re.findall(r'"(VIA_SD_[A-Z0-9_]+)"', (ROOT / rel).read_text()))
    return names


def flags_in(text: str) -> set[str]:
    """`--flag` names in a command line or shell script (values after `=` dropped)."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
