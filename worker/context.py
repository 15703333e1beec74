"""The worker process's runtime context (app.runtime.Runtime), built once at the process's init.

Celery calls a task with the message's arguments only, so the task finds the process's context
here; everything below it receives the context as an argument. Built by the worker's init
signals (worker.tasks): in the main process for the recovery sweep, in each forked pool process
for training.
"""

from __future__ import annotations

from celery import Celery, current_app

from app.core.config import Settings, get_settings
from app.runtime import Runtime
from worker.dispatch import CeleryQueue

_runtime: Runtime | None = None


def init(settings: Settings | None = None, celery: Celery | None = None) -> Runtime:
    """Build this process's context and keep it. Defaults: settings from the environment, and the
    running worker's own Celery app for the queue (a second app would become Celery's current one)."""
    global _runtime
    app = celery or current_app._get_current_object()
    _runtime = Runtime.build(settings or get_settings(), queue=CeleryQueue(app))
    return _runtime


def current() -> Runtime:
    """This process's context, built on first use when no init signal ran (e.g. a direct call)."""
    return _runtime or init()


def forget_inherited() -> None:
    """In a forked child: drop the parent's context without closing the sockets the parent uses."""
    global _runtime
    if _runtime is not None:
        _runtime.engine.dispose(close=False)
    _runtime = None
