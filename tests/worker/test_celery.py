"""Celery configuration and the dispatch helpers against the embedded transport and real Redis."""

from __future__ import annotations

import uuid

from app.core.config import Settings
from worker import celery_app, dispatch

REDIS_URL = "redis://127.0.0.1:6379/0"  # configuration only: nothing connects


def test_config_matches_the_training_contract(settings):
    app = celery_app.make_celery(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_ignore_result and not conf.result_backend
    assert conf.task_default_queue == settings.queue_name
    assert conf.broker_url == f"sqla+sqlite:///{(settings.data_dir / 'broker.db').resolve().as_posix()}"
    assert "visibility_timeout" not in conf.broker_transport_options

    redis_app = celery_app.make_celery(Settings(data_dir=settings.data_dir, broker_url=REDIS_URL))
    opts = redis_app.conf.broker_transport_options
    assert opts["visibility_timeout"] >= 3600  # recovery does not rely on it (worker.recovery)


def _use(monkeypatch, app) -> None:
    monkeypatch.setattr(celery_app, "app", app)


def test_embedded_broker_enqueue_and_depth(settings, monkeypatch):
    _use(monkeypatch, celery_app.make_celery(settings))
    assert dispatch.broker_ready()
    assert dispatch.queue_depth() == 0
    dispatch.enqueue_training("job-1")
    dispatch.enqueue_training("job-2")
    assert dispatch.queue_depth() == 2


def test_redis_enqueue_and_depth(settings, monkeypatch, redis_url):
    queue = f"sparseshot-test-{uuid.uuid4().hex[:8]}"
    app = celery_app.make_celery(Settings(data_dir=settings.data_dir, broker_url=redis_url, queue_name=queue))
    _use(monkeypatch, app)
    try:
        assert dispatch.broker_ready()
        assert dispatch.queue_depth() == 0  # Redis has no key for an empty queue
        dispatch.enqueue_training("job-1")
        assert dispatch.queue_depth() == 1
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def test_unreachable_broker_is_not_ready(settings, monkeypatch):
    bad = Settings(data_dir=settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    _use(monkeypatch, celery_app.make_celery(bad))
    assert dispatch.broker_ready() is False
    assert dispatch.queue_depth() is None


def test_worker_main_process_does_not_import_torch():
    # Pool children are forked from the worker's main process: CUDA must only start in a child.
    import subprocess
    import sys

    code = "import sys, worker.tasks, worker.recovery, worker.dispatch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
