"""Celery configuration and the dispatch helpers against the embedded transport and real Redis."""

from __future__ import annotations

import uuid

from app.core.config import Settings
from app.queue import Queue
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


def test_embedded_broker_enqueue_and_depth(settings):
    queue = dispatch.CeleryQueue.for_settings(settings)
    assert isinstance(queue, Queue)
    assert queue.ready()
    assert queue.queue_depth() == 0
    queue.enqueue_training("job-1")
    queue.enqueue_training("job-2")
    assert queue.queue_depth() == 2


def test_redis_enqueue_and_depth(settings, redis_url):
    name = f"sparseshot-test-{uuid.uuid4().hex[:8]}"
    app = celery_app.make_celery(Settings(data_dir=settings.data_dir, broker_url=redis_url, queue_name=name))
    queue = dispatch.CeleryQueue(app)
    try:
        assert queue.ready()
        assert queue.queue_depth() == 0  # Redis has no key for an empty queue
        queue.enqueue_training("job-1")
        assert queue.queue_depth() == 1
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)


def test_unreachable_broker_is_not_ready(settings):
    bad = Settings(data_dir=settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    queue = dispatch.CeleryQueue.for_settings(bad)
    assert queue.ready() is False
    assert queue.queue_depth() is None


def test_worker_main_process_does_not_import_torch():
    # Pool children are forked from the worker's main process: CUDA must only start in a child.
    import subprocess
    import sys

    modules = "worker.main, worker.tasks, worker.recovery, worker.dispatch"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
