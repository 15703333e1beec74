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
    assert {"api", "worker-0", "postgres", "redis", "migrate"} <= set(resolved["services"])


WORKERS = ("worker-0", "worker-1")


def test_compose_services_are_wired():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]
    for name in ("api", *WORKERS, "migrate"):
        env = svc[name]["environment"]
        assert env["SPARSESHOT_DATABASE_URL"].startswith("postgresql://")
        assert env["SPARSESHOT_BROKER_URL"].startswith("redis://")
        assert "data:/data" in svc[name]["volumes"]  # API and workers share images and deltas
    for name in WORKERS:
        assert svc[name]["command"] == ["sparseshot", "worker"]
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
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


def _gpu_of(service: dict) -> str:
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert "count" not in device  # `count: 1` on every replica would put them all on one GPU
    [gpu] = device["device_ids"]
    return str(gpu)


def test_each_worker_is_pinned_to_its_own_gpu():
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpus = [_gpu_of(svc[name]) for name in WORKERS]
    assert gpus == ["${SPARSESHOT_WORKER_0_GPU:-0}", "${SPARSESHOT_WORKER_1_GPU:-1}"]
    assert "profiles" not in svc["worker-0"]  # `docker compose up` on a one-GPU host
    assert svc["worker-1"]["profiles"] == ["gpus-2"]
    assert not any(name.startswith("worker") for name in svc if name not in WORKERS)


def test_every_service_of_the_image_can_build_it():
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("api", "migrate", *WORKERS):
        assert svc[name]["image"] == "sparseshot:latest" and svc[name]["build"] == ".", name


def test_only_the_api_uses_the_images_http_healthcheck():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile  # the API's, inherited by `api`
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "healthcheck" not in svc["api"]
    assert svc["migrate"]["healthcheck"] == {"disable": True}
    for name in WORKERS:
        check = svc[name]["healthcheck"]
        kind, command = check["test"]
        assert kind == "CMD-SHELL" and "healthz" not in command and "curl" not in command
        assert svc[name]["environment"]["SPARSESHOT_WORKER_ALIVE_FILE"] in command


def _worker_check(alive_file: Path) -> int:
    # The worker's health command as the container's shell runs it (compose turns $$ into $).
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    command = svc["worker-0"]["healthcheck"]["test"][1].replace("$$", "$")
    command = command.replace(svc["worker-0"]["environment"]["SPARSESHOT_WORKER_ALIVE_FILE"], str(alive_file))
    return subprocess.run(["sh", "-c", command], capture_output=True).returncode


def test_worker_healthcheck_follows_the_liveness_file(tmp_path):
    import os

    from worker.liveness import touch_if_ready

    alive = tmp_path / "alive"
    assert _worker_check(alive) != 0  # never written

    class Broker:
        up = False

        def ready(self) -> bool:
            return self.up

    runtime = type("R", (), {"queue": Broker()})()
    assert not touch_if_ready(runtime, alive) and _worker_check(alive) != 0  # broker down: not touched
    runtime.queue.up = True
    assert touch_if_ready(runtime, alive) and _worker_check(alive) == 0
    os.utime(alive, (0, 0))  # stale: the worker's main process stopped refreshing it
    assert _worker_check(alive) != 0


def test_setup_script_prints_its_steps():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    steps = [ln for ln in text.splitlines() if ln.strip().startswith("step ")]
    assert len(steps) >= 4 and any("minutes" in ln for ln in steps)
    out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
