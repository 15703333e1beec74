"""Dockerfile, docker-compose.yml and the prestart script, checked as far as this machine allows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert {"api", "worker", "postgres", "redis", "migrate"} <= set(resolved["services"])


def test_compose_services_are_wired():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]
    for name in ("api", "worker", "migrate"):
        env = svc[name]["environment"]
        assert env["SPARSESHOT_DATABASE_URL"].startswith("postgresql://")
        assert env["SPARSESHOT_BROKER_URL"].startswith("redis://")
        assert "data:/data" in svc[name]["volumes"]  # API and workers share images and deltas
    devices = svc["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert svc["worker"]["command"] == ["sparseshot", "worker"]
    assert svc["migrate"]["command"] == ["scripts/prestart.sh"]
    assert svc["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svc["postgres"]["healthcheck"] and svc["redis"]["healthcheck"]
    assert {"pgdata", "redisdata", "data"} <= set(spec["volumes"])


def test_dockerfile_basics():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert any(ln.startswith("RUN pip install -c constraints.txt torch") for ln in lines)
    assert "download.pytorch.org" not in text  # torch from PyPI (CUDA-capable wheels)
    assert any(ln.startswith("USER ") and "root" not in ln for ln in lines)
    assert 'CMD ["sparseshot", "serve", "--host", "0.0.0.0", "--port", "8000"]' in lines
    for copied in ("sparseshot", "app", "worker", "migrations", "scripts/prestart.sh"):
        assert any(ln.startswith(f"COPY {copied} ") for ln in lines), copied
        assert (ROOT / copied).exists()


def test_prestart_script_is_valid_sh():
    script = ROOT / "scripts" / "prestart.sh"
    assert script.stat().st_mode & 0o111
    out = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
