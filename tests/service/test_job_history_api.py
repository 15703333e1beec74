"""Presets and estimates on POST /v1/jobs, the training history and the SSE stream of a job."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.jobs.lifecycle import Claim
from app.models import Job
from app.services.history import MAX_POINTS, HistoryRecorder
from sparseshot import presets


@dataclass
class P:
    step: int
    total_steps: int
    loss: float
    train_accuracy: float
    eta_seconds: float = 0.0
    lr: float | None = 1e-3
    elapsed_seconds: float | None = None
    val_accuracy: float | None = None


def _set(engine, job_id: str, **values) -> None:
    with Session(engine) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_preset_sets_params_and_estimate(api) -> None:
    ds = api.ready_dataset()  # 2 images, 2 classes: 1 shot, batch 2
    job = api.job(ds["id"], preset="quick", params={"lr": 5e-3}).json()
    quick = presets.PRESETS["quick"]["so"]
    assert job["preset"] == "quick" and job["params"]["n_iters"] == quick["n_iters"]
    assert job["params"]["lr"] == 5e-3  # params win over the preset
    per_step = presets.step_seconds("sparseshot-tiny:random", "so", "cpu")
    assert job["estimated_seconds"] == round(quick["n_iters"] * per_step * 2 / presets.MEASURED_BATCH, 1)
    standard = api.job(ds["id"]).json()
    assert standard["preset"] == "standard" and standard["estimated_seconds"] > job["estimated_seconds"]
    body = api.problem(api.job(ds["id"], preset="fastest"), 422)
    assert "preset" in body["detail"]


def _claim(job_id: str, worker: str = "w1", attempt: int = 1) -> Claim:
    return Claim(job_id, worker, attempt, "t", None, "so", "b", {})


def _recorder(job_id: str, every: int = 1, engine=None) -> HistoryRecorder:
    return HistoryRecorder(claim=_claim(job_id), every_steps=every, engine=engine)


def test_history_is_recorded_every_n_steps_and_listed(api, engine) -> None:
    ds = api.ready_dataset()
    job = api.job(ds["id"]).json()
    rec = _recorder(job["id"], every=10, engine=engine)
    rec(P(1, 40, 2.0, 0.1))  # not running yet: nothing written
    _set(engine, job["id"], status="running", worker="w1", attempts=1)
    for step in range(1, 41):
        rec(P(step, 40, 2.0 / step, step / 40, lr=1e-3 * (1 - step / 40), elapsed_seconds=step * 0.1))
    items = api.client.get(f"/v1/jobs/{job['id']}/history", headers=api.headers).json()["items"]
    assert [i["step"] for i in items] == [1, 11, 21, 31, 40]  # every 10 steps plus the final one
    assert set(items[0]) == {"step", "loss", "train_accuracy", "lr", "val_accuracy", "elapsed_s"}
    assert items[1]["loss"] == 2.0 / 11 and items[-1]["lr"] == 0.0 and items[1]["elapsed_s"] == 1.1
    assert items[0]["val_accuracy"] is None

    # A later attempt resuming at step 25 replaces the points past it; the old attempt writes nothing.
    _set(engine, job["id"], worker="w2", attempts=2)
    rec(P(40, 40, 0.0, 1.0))
    second = HistoryRecorder(claim=_claim(job["id"], "w2", 2), every_steps=10, engine=engine)
    second(P(25, 40, 0.5, 0.5, lr=float("nan")))
    items = api.client.get(f"/v1/jobs/{job['id']}/history", headers=api.headers).json()["items"]
    assert [i["step"] for i in items] == [1, 11, 21, 25] and items[-1]["lr"] is None


def test_history_points_carry_the_latest_validation_pass(api, engine) -> None:
    job = api.job(api.ready_dataset()["id"]).json()
    _set(engine, job["id"], status="running", worker="w1", attempts=1)
    rec = _recorder(job["id"], every=10, engine=engine)
    for step in range(1, 31):  # passes at steps 5 and 8 (between points) and 30 (the final one)
        rec(P(step, 30, 1.0, 0.5, val_accuracy={5: 0.25, 8: 0.5, 30: 1.0}.get(step)))
    items = api.client.get(f"/v1/jobs/{job['id']}/history", headers=api.headers).json()["items"]
    assert [(i["step"], i["val_accuracy"]) for i in items] == [(1, None), (11, 0.5), (21, None), (30, 1.0)]


def test_history_is_bounded_for_long_runs() -> None:
    rec = _recorder("j", every=1)
    total = MAX_POINTS * 5
    due = [s for s in range(1, total + 1) if rec._due(s, total) and not rec.__setattr__("last_step", s)]
    assert len(due) <= MAX_POINTS + 1 and due[-1] == total


def test_history_and_events_are_tenant_scoped(api, make_key) -> None:
    job = api.job(api.ready_dataset()["id"]).json()
    other = make_key("globex")
    api.problem(api.client.get(f"/v1/jobs/{job['id']}/history", headers=other), 404)
    api.problem(api.client.get(f"/v1/jobs/{job['id']}/events", headers=other), 404)
    api.problem(api.client.get(f"/v1/jobs/{job['id']}/events"), 401)


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_events_stream_progress_then_end(api, engine, settings) -> None:
    settings.events_poll_s = 0.05
    settings.events_heartbeat_s = 0.1
    job = api.job(api.ready_dataset()["id"]).json()
    _set(engine, job["id"], status="running", step=1, total_steps=3)

    def trainer() -> None:
        time.sleep(0.4)
        _set(engine, job["id"], step=2, loss=0.5)
        time.sleep(0.4)
        _set(engine, job["id"], status="succeeded", step=3)

    t = threading.Thread(target=trainer)
    t.start()
    with api.client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=api.headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    t.join()
    events = _events(text)
    names = [e for e, _ in events]
    assert names[0] == "progress" and names[-1] == "end" and names.count("end") == 1
    steps = [d["progress"]["step"] for _, d in events]
    assert steps == sorted(steps) and 2 in steps and events[-1][1]["status"] == "succeeded"
    assert ": keep-alive" in text  # nothing changed for longer than the heartbeat
    # A finished job: the final event at once.
    with api.client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=api.headers) as r:
        assert [e for e, _ in _events("".join(r.iter_text()))] == ["end"]
