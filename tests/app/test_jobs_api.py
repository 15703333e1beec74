"""Training jobs through the API (the queue is a recorder here; the worker has its own tests)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.models import Job
from sparseshot import presets
from tests.fakes import RecordingQueue


def _set_status(engine, job_id: str, **values) -> None:
    with Session(engine) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_create_job_commits_then_enqueues(api, enqueued: list[str]) -> None:
    ds = api.ready_dataset()
    r = api.job(ds["id"], params={"n_iters": 3})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["method"] == "so" and job["dataset_id"] == ds["id"]
    assert job["base_model"] == "sparseshot-tiny:random"
    assert job["params"]["n_iters"] == 3 and len(job["params"]) > 1  # recipe defaults merged
    assert job["progress"] == {"step": 0, "total_steps": None, "loss": None, "train_accuracy": None,
                               "eta_seconds": None}  # fmt: skip
    assert enqueued == [job["id"]]
    assert api.client.get(r.headers["location"], headers=api.headers).json() == job


def test_job_params_are_validated(api, enqueued: list[str]) -> None:
    ds = api.ready_dataset()
    body = api.problem(api.job(ds["id"], params={"not_a_param": 1}), 422)
    assert "not_a_param" in body["detail"]
    api.problem(api.job(ds["id"], params={"lr": "fast"}), 422)
    api.problem(api.job(ds["id"], method="bogus"), 422)
    api.problem(api.job(ds["id"], params=[1, 2]), 422)
    api.problem(api.job(ds["id"], base_model="/etc/passwd:random"), 422)
    body = api.problem(api.job(ds["id"], params={"positions": [99]}), 422)  # the tiny base has 2 blocks
    assert "out of range" in body["detail"]
    api.problem(api.job(ds["id"], params={"delta_budget": 0}), 422)
    assert enqueued == []


def test_job_needs_images_in_every_class(api, enqueued: list[str]) -> None:
    ds = api.dataset()
    assert "no images" in api.problem(api.job(ds["id"]), 422)["detail"]
    assert api.upload(ds["id"], "cat", api.image()).status_code == 201
    assert "dog" in api.problem(api.job(ds["id"]), 422)["detail"]
    api.problem(api.job("00000000-0000-0000-0000-000000000000"), 404)
    assert enqueued == []


def test_broker_down_at_submit_is_503_and_leaves_no_job(api, queue: RecordingQueue) -> None:
    from kombu.exceptions import OperationalError

    # What kombu raises when Redis refuses the connection.
    queue.fail = OperationalError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")
    ds = api.ready_dataset()
    body = api.problem(api.job(ds["id"]), 503)
    assert "not created" in body["detail"]
    assert int(api.job(ds["id"]).headers["Retry-After"]) > 0
    assert api.client.get("/v1/jobs", headers=api.headers).json() == []  # nothing half-written


def test_list_jobs_filters_by_status(api, engine) -> None:
    ds = api.ready_dataset()
    a, b = api.job(ds["id"]).json(), api.job(ds["id"]).json()
    _set_status(engine, b["id"], status="running", step=2, total_steps=10, loss=0.5, eta_seconds=3.0)
    ids = lambda q: [j["id"] for j in api.client.get(f"/v1/jobs{q}", headers=api.headers).json()]  # noqa: E731
    assert sorted(ids("")) == sorted([a["id"], b["id"]])
    assert ids("?status=queued") == [a["id"]]
    assert ids("?status=running") == [b["id"]]
    running = api.client.get(f"/v1/jobs/{b['id']}", headers=api.headers).json()
    assert running["progress"]["step"] == 2 and running["progress"]["loss"] == 0.5


def test_cancel_queued_running_and_finished(api, engine) -> None:
    ds = api.ready_dataset()
    queued, running, done = (api.job(ds["id"]).json() for _ in range(3))
    _set_status(engine, running["id"], status="running")
    _set_status(engine, done["id"], status="succeeded")

    r = api.client.post(f"/v1/jobs/{queued['id']}/cancel", headers=api.headers)
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"]
    r = api.client.post(f"/v1/jobs/{queued['id']}/cancel", headers=api.headers)  # idempotent
    assert r.status_code == 202 and r.json()["status"] == "cancelled"

    r = api.client.post(f"/v1/jobs/{running['id']}/cancel", headers=api.headers)
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    api.problem(api.client.post(f"/v1/jobs/{done['id']}/cancel", headers=api.headers), 409)


def test_other_tenants_jobs_are_404(api, make_key) -> None:
    ds = api.ready_dataset()
    job = api.job(ds["id"]).json()
    other = make_key("globex")
    api.problem(api.client.get(f"/v1/jobs/{job['id']}", headers=other), 404)
    api.problem(api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=other), 404)
    r = api.client.post("/v1/jobs", json={"dataset_id": ds["id"], "method": "so"}, headers=other)
    api.problem(r, 404)
    assert api.client.get("/v1/jobs", headers=other).json() == []


def test_job_validation_option(api, enqueued: list[str]) -> None:
    ds = api.ready_dataset()  # one image per class: nothing can be held out, so k-fold runs instead
    r = api.job(ds["id"], params={"n_iters": 3}, validation={"holdout": 0.2})
    assert r.status_code == 202, r.text
    assert r.json()["validation"] == {"kfold": 2}  # min(3, shots = 1), at least 2
    body = api.problem(api.job(ds["id"], validation={"kfold": 3}), 422)  # 3 folds of 2 images
    assert "3-fold" in body["detail"] and "the dataset has 2" in body["detail"]
    for colour in ((250, 0, 0), (240, 0, 0)):  # cat: 3 images, dog: 1
        assert api.upload(ds["id"], "cat", api.image(colour)).status_code == 201
    for bad in ({"holdout": 0.9}, {"holdout_per_class": 0}, {"kfold": 1}, {"kfold": 11}, {"folds": 3},
                {"holdout": 0.2, "holdout_per_class": 1}):
        assert "validation" in api.problem(api.job(ds["id"], validation=bad), 422)["detail"]
    r = api.job(ds["id"], params={"n_iters": 3}, validation={"holdout_per_class": 1})
    assert r.status_code == 202, r.text
    assert r.json()["validation"] == {"holdout_per_class": 1}
    assert api.client.get(f"/v1/jobs/{r.json()['id']}", headers=api.headers).json()["validation"] == {
        "holdout_per_class": 1}
    assert api.job(ds["id"], params={"n_iters": 3}).json()["validation"] is None
    assert api.job(ds["id"], validation={"kfold": 4}).json()["validation"] == {"kfold": 4}
    assert len(enqueued) == 4


def test_kfold_trainings_are_part_of_the_estimate(api) -> None:
    ds = api.ready_dataset()
    for colour in ((250, 0, 0), (0, 0, 250)):  # 2 images per class: 2 shots
        assert api.upload(ds["id"], "cat" if colour[0] else "dog", api.image(colour)).status_code == 201
    plain = api.job(ds["id"]).json()  # standard preset: 2000 x 2 steps, batch 4
    cv = api.job(ds["id"], validation={"kfold": 2}).json()
    quick = presets.PRESETS["quick"]["so"]["n_iters"]
    # each fold trains on one image per class (1 shot, batch 2) with the quick preset's n_iters
    fold = presets.estimate_seconds("sparseshot-tiny:random", "so", "cpu", steps=quick, batch=2)
    assert fold is not None and fold > 0
    assert cv["estimated_seconds"] == round(plain["estimated_seconds"] + 2 * fold, 1)
    assert cv["estimated_seconds"] > plain["estimated_seconds"]
