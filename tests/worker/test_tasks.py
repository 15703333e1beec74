"""The training task's bookkeeping, with sparseshot.adapt replaced by a fake (the real one runs in e2e)."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image as PILImage

import sparseshot
from app.db import session_scope
from app.jobs import lifecycle
from app.jobs.status import JobStatus
from app.models import Dataset, Image, Job, JobHistory, Model, Tenant, utcnow
from app.storage import get_storage
from app.webhooks import dispatch
from sparseshot import crossval
from sparseshot.presets import PRESETS
from sparseshot.recipe import Progress
from tests.fakes import Receiver
from worker import tasks
from worker.claims import claim_job


class FakeCancelled(Exception):
    pass


@dataclass
class FakeDelta:
    meta: dict[str, Any] = field(default_factory=lambda: {"template": "a photo of a {}."})
    nnz: int = 7
    nbytes: int = 123
    density: float = 1e-5

    def to_bytes(self) -> bytes:
        return b"delta-" + str(self.nnz).encode()


@dataclass
class FakeResult:
    delta: FakeDelta
    metrics: dict[str, Any]
    val_probs: list[list[float]] | None = None


def fake_adapt_factory(calls: list[dict[str, Any]], *, steps: int = 3, sleep: float = 0.0,
                       fail: Exception | None = None):
    def adapt(base, images, labels, classes, method="so", *, on_progress=None, should_stop=None,
              checkpoint=None, val_images=(), val_labels=(), **hp):
        calls.append(dict(n_images=len(images), sizes=[im.size for im in images], labels=list(labels),
                          classes=list(classes), method=method, val_labels=list(val_labels),
                          val_sizes=[im.size for im in val_images], checkpoint=checkpoint, hparams=hp))
        for step in range(1, steps + 1):
            if should_stop is not None and should_stop():
                raise sparseshot.Cancelled()
            if fail is not None:
                raise fail
            time.sleep(sleep)
            if on_progress is not None:
                on_progress(Progress(step, steps, 1.0 / step, 0.5, (steps - step) * sleep))
        metrics = {"steps": steps, "final_loss": 0.25, "train_accuracy": 1.0}
        if not val_labels:
            return FakeResult(FakeDelta(), metrics)
        probs = [[1.0 if c == 0 else 0.0 for c in range(len(classes))] for _ in val_labels]  # always class 0
        metrics["val_accuracy"] = sum(y == 0 for y in val_labels) / len(val_labels)
        metrics["validation"] = {"mode": "holdout", "n_images": len(val_labels)}  # the library adds a report
        return FakeResult(FakeDelta(), metrics, probs)

    return adapt


@pytest.fixture
def fake_lib(monkeypatch, runtime):
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(vars(sparseshot), "Cancelled", FakeCancelled)
    monkeypatch.setitem(vars(sparseshot), "adapt", fake_adapt_factory(calls))
    monkeypatch.setattr(crossval, "adapt", fake_adapt_factory(calls))  # the folds of a k-fold job
    monkeypatch.setattr(runtime.bases, "get", lambda spec=None: SimpleNamespace(image_size=16))
    return calls


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def make_job(*, n_per_class: int = 2, params: dict[str, Any] | None = None, method: str = "so",
             validation: dict[str, Any] | None = None, webhook_url: str | None = None) -> str:
    storage = get_storage()
    with session_scope() as s:
        tenant = Tenant(name=f"t-{time.monotonic_ns()}")
        s.add(tenant)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="d", classes=["cat", "dog"])
        s.add(ds)
        s.flush()
        for ci, label in enumerate(ds.classes):
            for i in range(n_per_class):
                data = _png((ci * 100, i * 10, 5))
                key = storage.put(data)
                s.add(Image(dataset_id=ds.id, label=label, sha256=key, storage_key=key, filename=f"{i}.png",
                            format="PNG", width=8, height=8, nbytes=len(data)))
        job = Job(tenant_id=tenant.id, dataset_id=ds.id, method=method, base_model="sparseshot-tiny:random",
                  params=params or {"n_iters": 3}, validation=validation, webhook_url=webhook_url)
        s.add(job)
        s.flush()
        return job.id


def get_job(job_id: str) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _run_until_step_2(job_id: str, runtime: Any) -> tuple[threading.Thread, list[str]]:
    """run_job in a thread (its return value lands in the list), back once it reported step 2 (or 5 s)."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(tasks.run_job(job_id, runtime=runtime, worker="w1")))
    t.start()
    deadline = time.monotonic() + 5
    while get_job(job_id).step < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return t, out


def test_success_creates_model_in_one_go(settings, runtime, fake_lib):
    job_id = make_job()
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    job = get_job(job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.worker == "w1"
    assert job.step == 3 and job.loss == 0.25 and job.finished_at is not None
    with session_scope() as s:
        model = s.get(Model, job.model_id)
        assert model is not None
        assert model.classes == ["cat", "dog"] and model.nnz == 7 and model.job_id == job_id
        assert model.template == "a photo of a {}."
        assert get_storage().get(model.delta_key) == b"delta-7"
    call = fake_lib[0]
    assert call["n_images"] == 4 and sorted(call["labels"]) == [0, 0, 1, 1]
    assert call["hparams"] == {"n_iters": 3}
    assert call["checkpoint"].endswith(f"checkpoints/{job_id}.pt")
    assert not Path(call["checkpoint"]).exists()


def test_validation_split_holds_images_out_of_training(settings, runtime, fake_lib):
    job_id = make_job(n_per_class=4, validation={"holdout_per_class": 1}, params={"n_iters": 3, "seed": 5})
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    call = fake_lib[0]
    assert call["n_images"] == 6 and sorted(call["labels"]) == [0, 0, 0, 1, 1, 1]
    assert sorted(call["val_labels"]) == [0, 1] and len(call["val_sizes"]) == 2
    assert "val_images" not in call["hparams"]
    with session_scope() as s:  # stored as JSON, not flattened to a string
        stored = s.get(Model, get_job(job_id).model_id).metrics["validation"]
    assert stored == {"mode": "holdout", "n_images": 2}
    assert fake_lib[0]["hparams"] == {"n_iters": 3, "seed": 5} and get_job(job_id).validation is not None


def test_too_few_images_to_hold_out_cross_validate_first(settings, runtime, fake_lib):
    job_id = make_job(n_per_class=2, validation={"holdout": 0.5}, params={"n_iters": 3, "seed": 5})
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    *folds, final = fake_lib
    assert len(folds) == 2  # k = min(3, shots = 2)
    for call in folds:  # each trains on one image per class and is measured on the others
        assert sorted(call["labels"]) == [0, 1] and sorted(call["val_labels"]) == [0, 1]
        assert call["hparams"]["lr"] == PRESETS["quick"]["so"]["lr"] and call["hparams"]["n_iters"] == 3
        assert call["checkpoint"] is None
    assert final["n_images"] == 4 and final["val_labels"] == []
    assert final["hparams"] == {"n_iters": 3, "seed": 5}  # the job's own
    job = get_job(job_id)
    assert job.step == job.total_steps == 3 * 3  # two folds and the training, 3 steps each (the fakes)
    with session_scope() as s:
        metrics = s.get(Model, job.model_id).metrics
        history_steps = [r.step for r in s.query(JobHistory).filter_by(job_id=job_id)]
    assert metrics["cv_folds"] == 2 and metrics["cv_accuracy"] == 0.5 and metrics["cv_steps"] == 6
    v = metrics["validation"]
    assert v["mode"] == "kfold" and v["fold_accuracies"] == [0.5, 0.5] and v["n_images"] == 4
    assert v["confusion_matrix"] == [[2, 0], [2, 0]] and v["per_class"]["dog"]["support"] == 2
    assert history_steps and min(history_steps) > 6  # the curve is the model's own training


def test_a_dataset_too_small_to_validate_trains_unvalidated(settings, runtime, fake_lib):
    job_id = make_job(n_per_class=1, validation={"holdout": 0.5})
    with session_scope() as s:  # one image left: nothing to validate on when the job runs
        s.delete(s.query(Image).filter_by(dataset_id=s.get(Job, job_id).dataset_id).first())
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    assert len(fake_lib) == 1 and fake_lib[0]["val_labels"] == [] and fake_lib[0]["n_images"] == 1
    with session_scope() as s:
        metrics = s.get(Model, get_job(job_id).model_id).metrics
    assert metrics["val_images"] == 0 and "validation" not in metrics


def test_cancel_during_the_folds(settings, runtime, monkeypatch, fake_lib):
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(crossval, "adapt", fake_adapt_factory(calls, steps=200, sleep=0.05))
    job_id = make_job(n_per_class=2, validation={"kfold": 2})
    t, out = _run_until_step_2(job_id, runtime)
    job = get_job(job_id)
    assert job.status == "running" and job.total_steps is not None
    # this fold's 200 (as the fake reports them), the second fold's planned 3 (n_iters 3, 1 shot) and
    # the training's 6 (2 shots)
    assert job.total_steps == 200 + 3 + 6
    with session_scope() as s:
        s.get(Job, job_id).cancel_requested = True
    t.join(timeout=10)
    assert out == ["cancelled"] and len(calls) == 1 and fake_lib == []  # in the first fold; no training
    assert get_job(job_id).status == "cancelled"


def test_a_finished_job_notifies_its_webhook_with_the_model(settings, runtime, fake_lib, monkeypatch):
    receiver = Receiver(200)
    try:
        monkeypatch.setattr(settings, "webhook_allow_private", True)  # the loopback receiver
        ok, bad = make_job(webhook_url=receiver.url), make_job(n_per_class=0, webhook_url=receiver.url)
        assert tasks.run_job(ok, runtime=runtime, worker="w1") == "succeeded"
        assert tasks.run_job(bad, runtime=runtime, worker="w1") == "failed"  # no images
        assert dispatch.deliver_due(runtime) == 2
        events = {json.loads(r["body"])["job"]["id"]: json.loads(r["body"]) for r in receiver.requests}
    finally:
        receiver.close()
    assert events[ok]["event"] == "job.succeeded" and events[ok]["model_id"] == get_job(ok).model_id
    assert events[ok]["model_id"] is not None and events[ok]["job"]["model_id"] == events[ok]["model_id"]
    assert events[bad]["event"] == "job.failed" and events[bad]["job"]["error"] == get_job(bad).error


def test_training_images_are_kept_at_the_models_input_size(settings, runtime, fake_lib):
    job_id = make_job(n_per_class=1)
    with session_scope() as s:  # one large image, stored as an upload would
        ds_id = s.get(Job, job_id).dataset_id
        buf = io.BytesIO()
        PILImage.new("L", (1200, 600), 7).save(buf, format="PNG")
        key = get_storage().put(buf.getvalue())
        s.add(Image(dataset_id=ds_id, label="cat", sha256=key, storage_key=key, filename="big.png",
                    format="PNG", width=1200, height=600, nbytes=len(buf.getvalue())))
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    assert sorted(fake_lib[0]["sizes"]) == [(8, 8), (8, 8), (32, 16)]  # shorter side 16, never upscaled


def test_duplicate_message_is_dropped(settings, runtime, fake_lib):
    job_id = make_job()
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded"
    assert tasks.run_job(job_id, runtime=runtime, worker="w2") == "skipped"
    assert len(fake_lib) == 1
    assert get_job(job_id).worker == "w1"
    with session_scope() as s:
        assert s.query(Model).count() == 1


def test_job_running_elsewhere_is_not_run_twice(settings, runtime, fake_lib):
    job_id = make_job()
    assert claim_job(runtime, job_id, "w1") is not None
    assert tasks.run_job(job_id, runtime=runtime, worker="w2") == "skipped"  # heartbeat is fresh
    assert fake_lib == []


def test_stale_running_job_is_taken_over_and_old_owner_cannot_write(settings, runtime, fake_lib):
    job_id = make_job()
    old = claim_job(runtime, job_id, "dead")
    assert old is not None
    with session_scope() as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)
    assert tasks.run_job(job_id, runtime=runtime, worker="w2") == "succeeded"
    job = get_job(job_id)
    assert job.attempts == 2 and job.worker == "w2"
    with session_scope() as s:  # the dead worker's late write is refused
        assert not lifecycle.finish(s, claim=old, status=JobStatus.FAILED, now=utcnow())
    assert get_job(job_id).status == "succeeded"


def test_failure_is_recorded_with_reason(settings, runtime, monkeypatch, fake_lib):
    monkeypatch.setitem(vars(sparseshot), "adapt", fake_adapt_factory([], fail=RuntimeError("boom")))
    job_id = make_job()
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "failed"
    job = get_job(job_id)
    assert job.status == "failed" and "RuntimeError: boom" in (job.error or "")
    assert job.finished_at is not None and job.model_id is None


def test_deleted_dataset_fails_clearly(settings, runtime, fake_lib):
    job_id = make_job()
    with session_scope() as s:
        job = s.get(Job, job_id)
        s.delete(s.get(Dataset, job.dataset_id))
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "failed"
    assert "dataset was deleted" in (get_job(job_id).error or "")


def test_cancel_while_running(settings, runtime, monkeypatch, fake_lib):
    monkeypatch.setitem(vars(sparseshot), "adapt", fake_adapt_factory([], steps=200, sleep=0.05))
    job_id = make_job()
    t, out = _run_until_step_2(job_id, runtime)
    assert get_job(job_id).status == "running" and get_job(job_id).heartbeat_at is not None
    t0 = time.monotonic()
    with session_scope() as s:
        s.get(Job, job_id).cancel_requested = True
    t.join(timeout=10)
    assert out == ["cancelled"] and time.monotonic() - t0 < 3
    job = get_job(job_id)
    assert job.status == "cancelled" and job.finished_at is not None and job.model_id is None


def test_cancel_before_start_and_attempt_limit(settings, runtime, fake_lib):
    job_id = make_job()
    with session_scope() as s:
        s.get(Job, job_id).cancel_requested = True
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "skipped"
    assert get_job(job_id).status == "cancelled"

    job_id = make_job()
    with session_scope() as s:
        s.get(Job, job_id).attempts = settings.job_max_attempts
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "skipped"
    job = get_job(job_id)
    assert job.status == "failed" and "attempts" in (job.error or "")
    assert fake_lib == []


def test_storage_error_after_training_leaves_job_for_recovery(settings, runtime, monkeypatch, fake_lib):
    def broken_store(delta, storage):
        raise OSError("disk full")

    monkeypatch.setattr(tasks, "_store_delta", broken_store)
    job_id = make_job()
    with pytest.raises(OSError):
        tasks.run_job(job_id, runtime=runtime, worker="w1")
    job = get_job(job_id)
    assert job.status == "running" and job.model_id is None  # the sweep re-queues it after the timeout


@pytest.mark.parametrize("method", ["so", "lora"])
def test_real_training_produces_a_servable_model(settings, runtime, method):
    from app.services import inference

    job_id = make_job(params={"n_iters": 2, "batch_size": 4}, method=method)
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded", get_job(job_id).error
    job = get_job(job_id)
    assert job.total_steps == 4 and job.step == 4
    with session_scope() as s:
        model = s.get(Model, job.model_id)
        s.expunge(model)
    assert model.method == method and model.nbytes > 0
    (pred,) = inference.classify(model=model, images=[("q.png", PILImage.new("RGB", (8, 8)))], top_k=2,
                                 storage=runtime.storage, serving=runtime.serving())
    assert {lab["label"] for lab in pred["labels"]} == {"cat", "dog"}


def test_real_kfold_job(settings, runtime):
    job_id = make_job(n_per_class=2, params={"n_iters": 2, "batch_size": 4}, validation={"kfold": 2})
    assert tasks.run_job(job_id, runtime=runtime, worker="w1") == "succeeded", get_job(job_id).error
    job = get_job(job_id)
    with session_scope() as s:
        metrics = s.get(Model, job.model_id).metrics
    assert metrics["cv_steps"] >= 2 * 2  # two folds of n_iters x 1 shot (plus any refine steps)
    assert job.step == job.total_steps == metrics["cv_steps"] + metrics["steps"]
    v = metrics["validation"]
    assert v["mode"] == "kfold" and v["classes"] == ["cat", "dog"] and len(v["fold_accuracies"]) == 2
    assert [sum(row) for row in v["confusion_matrix"]] == [2, 2]  # every image measured once
    assert v["accuracy"] == metrics["cv_accuracy"] == sum(v["fold_accuracies"]) / 2
    assert {m["support"] for m in v["per_class"].values()} == {2}



_MMAP_PROBE = """
import ctypes, sys
from worker.memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd  # bytes in mmap'ed blocks
buf = ctypes.create_string_buffer(64 << 20)
print("mmap" if libc.mallinfo2().hblkhd - before >= (64 << 20) else "heap")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc allocator settings")
def test_training_processes_keep_large_buffers_off_mmap() -> None:
    # Children, so the test process keeps its allocator defaults; the default run shows the probe works.
    def where(mode: str) -> str:
        cmd = [sys.executable, "-c", _MMAP_PROBE, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert where("default") == "mmap"
    assert where("keep") == "heap"
