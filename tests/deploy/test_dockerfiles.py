"""The Dockerfiles copy only files that exist, install through the project's own Makefile (so the
pins in pyproject.toml and the Makefile are the only copies), run as a non-root user, check
/health, and serve. Building the CPU image needs a Docker engine; without one the build is
skipped with the reason."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER, ROOT, flags_in, serve_flags

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist(path):
    for word, args in instructions(path):
        if word in ("COPY", "ADD"):
            parts = [a for a in exec_form(args) if not a.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: {word} {src}: no such file in the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_through_the_makefile(path):
    ins = instructions(path)
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "make install" in runs
    # the torch pin is read from pyproject.toml, never written down again
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        assert dep not in runs, f"{path.name} repeats the pin {dep}; read it from pyproject.toml"
    makefile = (ROOT / "Makefile").read_text()
    for pin in re.findall(r"[A-Za-z0-9_.-]+==[0-9][^\s'\"]*", makefile):
        assert pin not in runs, f"{path.name} repeats {pin} from the Makefile"
    assert "install:" in makefile and "prepare-model" in makefile


def test_pin_script_reads_pyproject():
    r = subprocess.run([sys.executable, str(DOCKER / "pyproject_pin.py"), "torch", str(ROOT / "pyproject.toml")],
                       capture_output=True, text=True, timeout=30)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert r.returncode == 0 and r.stdout.strip() in deps and r.stdout.startswith("torch")
    r = subprocess.run([sys.executable, str(DOCKER / "pyproject_pin.py"), "no-such-package", str(ROOT / "pyproject.toml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "no-such-package" in r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_and_checks_health(path):
    ins = dict(instructions(path))
    assert ins["USER"] not in ("root", "0")
    assert "/health" in ins["HEALTHCHECK"] and "8000" in ins["HEALTHCHECK"]
    cmd = exec_form(ins["CMD"])
    assert cmd[:2] == ["via-sd", "serve"]
    assert flags_in(" ".join(cmd)) <= serve_flags()
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    if path.name.endswith("cuda"):
        assert "--backend" in cmd and cmd[cmd.index("--backend") + 1] == "vllm"


def test_cuda_image_checks_the_vllm_plugin_entry_point():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert "vllm.general_plugins" in text
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert "via_sd" in eps


def _docker_engine() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    return None if r.returncode == 0 else "no Docker engine reachable (docker info failed)"


@pytest.mark.slow
def test_cpu_image_builds():
    reason = _docker_engine()
    if reason:
        pytest.skip(reason)
    r = subprocess.run(["docker", "build", "-f", str(DOCKER / "Dockerfile.cpu"), "-t", "via-sd:test-cpu", str(ROOT)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_dockerignore_keeps_the_venv_out_and_the_build_inputs_in():
    path = ROOT / ".dockerignore"
    if not path.is_file():
        pytest.skip("no .dockerignore at the repository root yet")
    patterns = [l.strip().rstrip("/") for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ".venv" in patterns or ".venv*" in patterns, ".dockerignore must exclude the local .venv"
    needed = {"pyproject.toml", "Makefile", "docker", "docker/pyproject_pin.py", "server", "via_sd_kernels"}
    assert not needed & set(patterns), f".dockerignore excludes {sorted(needed & set(patterns))}, which the images need"
