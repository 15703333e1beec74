"""The worker's part of the `sparseshot` command (worker/cli.py), found by app.cli as a plugin."""

from __future__ import annotations

from pathlib import Path

from app import cli
from app.core.config import Settings
from app.queue import Queue
from worker import cli as worker_cli
from worker.dispatch import CeleryQueue

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_registers_the_worker_plugin() -> None:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib: Python 3.11+)
    assert f'[project.entry-points."{cli.PLUGIN_GROUP}"]\nworker = "worker.cli:plugin"\n' in text
    assert '[project.scripts]\nsparseshot = "app.cli:main"\n' in text


def test_the_installed_command_finds_it() -> None:
    # Fails on an install older than the entry point: reinstall (bash scripts/setup.sh).
    assert cli.plugins() == [worker_cli.plugin]


def test_worker_command_is_added_to_the_parser() -> None:
    args = cli.build_parser().parse_args(["worker", "--hostname", "w1@%h"])
    assert args.func is worker_cli.cmd_worker and args.hostname == "w1@%h"
    assert cli.build_parser().parse_args(["worker"]).hostname is None


def test_serve_gets_the_celery_queue_of_its_settings(env_settings: Settings) -> None:
    queue = worker_cli.plugin.queue(env_settings)
    assert isinstance(queue, CeleryQueue) and isinstance(queue, Queue)
    assert queue.queue == env_settings.queue_name
