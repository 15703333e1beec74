"""The worker package's part of the `sparseshot` command, registered with app.cli as the
`sparseshot.cli` entry point `worker` (pyproject.toml): the `worker` command, and for
`sparseshot serve` the Celery-backed queue and the embedded worker.

Celery is imported inside the functions so that `sparseshot --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from worker.embedded import EmbeddedWorker, worker_argv

if TYPE_CHECKING:
    from argparse import _SubParsersAction

    from app.core.config import Settings
    from worker.dispatch import CeleryQueue


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker on the training queue (one training at a time)."""
    from app.core.config import get_settings
    from worker.celery_app import make_celery

    settings = get_settings()
    argv = worker_argv(settings.queue_name, loglevel=args.log_level, hostname=args.hostname)
    make_celery(settings).worker_main(argv[2:])  # drop "-A worker.main": the app is given
    return 0


class WorkerPlugin:
    """app.cli.Plugin of the worker package."""

    def add_commands(self, sub: _SubParsersAction[argparse.ArgumentParser]) -> None:
        w = sub.add_parser("worker", help="run a training worker (Celery)")
        w.add_argument("--hostname", default=None, help="Celery node name (default: unique)")
        w.set_defaults(func=cmd_worker)

    def queue(self, settings: Settings) -> CeleryQueue:
        from worker.dispatch import CeleryQueue

        return CeleryQueue.for_settings(settings)

    def start_worker(self, settings: Settings) -> EmbeddedWorker:
        return EmbeddedWorker(settings.queue_name).start()


plugin = WorkerPlugin()
