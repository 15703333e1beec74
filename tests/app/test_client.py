"""sparseshot.client and the client commands of the CLI against the real app (TestClient transport).

The queue is a recorder here, so a thread plays the worker by writing the job row; the real
worker and model server run in tests/e2e/test_client_e2e.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from app import cli, quotas
from app.models import Job
from sparseshot import sample_data
from sparseshot.client import (
    ApiError,
    Client,
    Conflict,
    InvalidInput,
    JobFailed,
    NotFound,
    QuotaExceeded,
    ServiceUnavailable,
    Unauthorized,
    progress_line,
)
from sparseshot.client import (
    Job as ClientJob,
)
from tests.app.test_models_api import fake_inference  # noqa: F401 - fixture


@pytest.fixture
def sdk(client, headers) -> Client:
    return Client("http://testserver", headers["Authorization"].split()[1], http=client)


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    return sample_data.generate(tmp_path / "sample", per_class=5, queries=1)


def _play_worker(engine, job_id: str, end: str = "succeeded",
                 model_id: str | None = None) -> threading.Thread:
    def run() -> None:
        for step in (1, 2, 3):
            time.sleep(0.15)
            with Session(engine) as s:
                s.execute(update(Job).where(Job.id == job_id).values(
                    status="running", step=step, total_steps=3, loss=1.0 / step, eta_seconds=3 - step))
                s.commit()
        with Session(engine) as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status=end, model_id=model_id, error="boom" if end == "failed" else None))
            s.commit()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_sample_data_is_reproducible(tmp_path: Path) -> None:
    a = sample_data.generate(tmp_path / "a", per_class=2, queries=1)
    b = sample_data.generate(tmp_path / "b", per_class=2, queries=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * 3 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert len({(a / f).read_bytes() for f in files}) == len(files)


def test_datasets_upload_in_batches_and_errors(sdk: Client, samples: Path) -> None:
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    # Folder of class folders; the server takes 4 files per request, the client starts at 16.
    out = sdk.upload(ds, samples / "train")
    assert len(out["added"]) == 15 and out["rejected"] == []
    assert sdk.get_dataset(ds["id"])["image_counts"] == {c: 5 for c in sample_data.CLASSES}
    # The same images again: all duplicates, reported with the image they duplicate.
    again = sdk.upload(ds["id"], samples / "train")
    assert again["added"] == [] and len(again["rejected"]) == 15
    assert all(r["duplicate_of"] for r in again["rejected"])
    # Files of one label; a non-image is rejected, the rest kept.
    extra = [("x.png", (samples / "query" / "red_circle_q0.png").read_bytes()), ("bad.png", b"nope")]
    out = sdk.upload(ds, extra, label="red circle")
    assert len(out["added"]) == 1 and out["rejected"][0]["filename"] == "bad.png"
    only_bad = sdk.upload(ds, [("bad2.png", b"still not")], label="red circle")
    assert only_bad["added"] == [] and len(only_bad["rejected"]) == 1
    assert [d["id"] for d in sdk.list_datasets()] == [ds["id"]]
    with pytest.raises(InvalidInput) as e:
        sdk.upload(ds, extra, label="purple")
    assert e.value.status == 422 and "purple" in e.value.detail and e.value.body["status"] == 422
    with pytest.raises(ValueError):
        sdk.upload(ds, extra)  # files need a label
    with pytest.raises(NotFound) as nf:
        sdk.get_dataset("00000000-0000-0000-0000-000000000000")
    assert nf.value.status == 404 and nf.value.title == "Not found"
    sdk.delete_dataset(ds)
    with pytest.raises(NotFound):
        sdk.get_dataset(ds)


def test_unauthorized_is_typed(client) -> None:
    with pytest.raises(Unauthorized) as e:
        Client("http://testserver", "sk_nope_nope", http=client).list_datasets()
    assert isinstance(e.value, ApiError) and e.value.status == 401


def test_quota_and_unavailable_answers_are_typed(sdk: Client, engine, queue, samples: Path) -> None:
    """429 -> QuotaExceeded with the limit's name, value and usage; 503 -> ServiceUnavailable with
    the server's Retry-After."""
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    sdk.upload(ds, samples / "train")
    with Session(engine) as s:
        quotas.set_limits(session=s, tenant_name="acme", values={"max_queued_jobs": 1})
    sdk.train(ds, preset="quick")
    with pytest.raises(QuotaExceeded) as e:
        sdk.train(ds, preset="quick")
    err = e.value
    assert isinstance(err, ApiError) and err.status == 429 and not isinstance(err, InvalidInput)
    assert (err.limit, err.value, err.current) == ("max_queued_jobs", 1, 1)
    assert err.retry_after is None and "max_queued_jobs" in str(err)

    with Session(engine) as s:
        quotas.set_limits(session=s, tenant_name="acme", values={"max_queued_jobs": None})
    queue.fail = ConnectionError("broker down")
    with pytest.raises(ServiceUnavailable) as unavailable:
        sdk.train(ds, preset="quick")
    assert unavailable.value.retry_after is not None and unavailable.value.retry_after > 0
    assert len(sdk.list_jobs()) == 1  # the refused submit left no job


def test_retry_after_header_forms() -> None:
    import email.utils

    from sparseshot.client import _retry_after

    assert _retry_after("7") == 7.0 and _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert 3000 < (_retry_after(later) or 0) <= 3600
    assert _retry_after(email.utils.formatdate(0, usegmt=True)) == 0.0


def test_train_wait_history_cancel(sdk: Client, engine, samples: Path, enqueued: list[str]) -> None:
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    sdk.upload(ds, samples / "train")
    job = sdk.train(ds, preset="quick", params={"lr": 5e-3})
    assert isinstance(job, ClientJob) and job.status == "queued" and enqueued == [job.id]
    assert job.data["preset"] == "quick" and job.data["params"]["lr"] == 5e-3
    assert job.data["estimated_seconds"] > 0
    t = _play_worker(engine, job.id, model_id=None)
    stream = io.StringIO()
    job.wait(progress=True, poll=0.05, timeout=30, stream=stream)
    t.join()
    assert job.status == "succeeded"
    lines = stream.getvalue().splitlines()
    assert any("3/3" in ln for ln in lines) and "loss" in lines[-1] and lines[-1].endswith("succeeded")
    assert sdk.history(job) == [] and job.history() == []  # nobody recorded points here
    assert [j.id for j in sdk.list_jobs(status="succeeded")] == [job.id]
    with pytest.raises(Conflict):
        job.cancel()

    failing = sdk.train(ds, preset="quick")
    t = _play_worker(engine, failing.id, end="failed")
    with pytest.raises(JobFailed, match="boom"):
        failing.wait(poll=0.05, timeout=30)
    t.join()
    queued = sdk.train(ds.get("id"), method="lora")
    assert queued.cancel().status == "cancelled"
    with pytest.raises(TimeoutError):
        sdk.train(ds, preset="thorough").wait(poll=0.05, timeout=0.2)
    with pytest.raises(InvalidInput, match="preset|Input"):
        sdk.train(ds, preset="nope")


def test_webhook_options_through_the_client(sdk: Client, samples: Path) -> None:
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    sdk.upload(ds, samples / "train")
    with pytest.raises(InvalidInput, match="SPARSESHOT_WEBHOOK_ALLOW_PRIVATE"):
        sdk.train(ds, preset="quick", webhook_url="http://127.0.0.1:9/hook")
    url = "https://93.184.215.14/hook"  # a public address literal: accepted without DNS
    job = sdk.train(ds, preset="quick", webhook_url=url)
    assert job.data["webhook_url"] == url
    assert sdk.deliveries(job) == []  # nothing until the job ends
    job.cancel()
    [delivery] = sdk.deliveries(job)
    assert delivery["event"] == "job.cancelled" and delivery["state"] == "pending" and delivery["url"] == url
    secret = sdk.webhook_secret()
    assert sdk.webhook_secret() == secret and sdk.webhook_secret(rotate=True) != secret


def test_events_through_the_client(sdk: Client, engine, settings, samples: Path) -> None:
    settings.events_poll_s = 0.05
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    sdk.upload(ds, samples / "train")
    job = sdk.train(ds, preset="quick")
    t = _play_worker(engine, job.id)
    events = list(sdk.events(job))
    t.join()
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
    assert {name for name, _ in events[:-1]} == {"progress"}


def test_models_classify_download_and_missing_endpoints(sdk: Client, fake_inference, tmp_path: Path,  # noqa: F811
                                                        samples: Path) -> None:
    model = sdk.zeroshot(["cat", "dog", "bird"])
    assert [m["id"] for m in sdk.list_models()] == [model["id"]] and sdk.get_model(model)["id"] == model["id"]
    queries = sorted((samples / "query").glob("*.png"))
    preds = sdk.classify(model, queries, top_k=2, batch_size=2)  # 3 images in 2 requests
    assert [p["filename"] for p in preds] == [q.name for q in queries]
    assert all(len(p["labels"]) == 2 for p in preds) and len(fake_inference) == 2
    path = sdk.download_delta(model, tmp_path)
    assert path == tmp_path / f"{model['id']}.safetensors" and json.loads(path.read_bytes())["classes"]
    cut = sdk.classify(model, queries[:1], top_k=3, threshold={"cat": 0.7})  # the stand-in: 0.6, 0.3, 0.1
    assert [lab["label"] for lab in cut[0]["labels"]] == ["dog", "bird"] and not cut[0]["unknown"]
    assert sdk.classify(model, queries[:1], threshold=0.9)[0]["unknown"] is True
    ds = sdk.create_dataset("pets", ["cat", "dog"])
    sdk.upload(ds, queries[:2], label="dog")
    ev = sdk.evaluate(model, ds)  # the stand-in says "cat" for everything
    assert ev["confusion_matrix"] == [[0, 0, 0], [2, 0, 0], [0, 0, 0]] and ev["accuracy"] == 0.0
    assert sdk.list_evaluations(model) == [ev]
    with pytest.raises(InvalidInput) as e:  # the fake inference's file is no delta: refused as such
        sdk.import_delta(path, name="copy")
    assert e.value.status == 422 and "delta file" in str(e.value)
    sdk.delete_model(model)
    with pytest.raises(NotFound):
        sdk.download_delta(model, tmp_path / "gone.safetensors")
    assert not (tmp_path / "gone.safetensors").exists()


def test_progress_line() -> None:
    line = progress_line({"status": "running", "progress": {"step": 50, "total_steps": 200, "loss": 0.5,
                                                             "train_accuracy": 0.25, "eta_seconds": 95}})
    assert "50/200" in line and "loss 0.500" in line and "ETA 1m35s" in line and line.count("#") == 6
    assert "ETA ?" in progress_line({"status": "queued", "progress": {"step": 0}})


def test_cli_client_commands(sdk: Client, engine, samples: Path, tmp_path: Path, capsys,
                             monkeypatch, fake_inference) -> None:  # noqa: F811
    monkeypatch.setattr(cli, "_client", lambda args: sdk)
    assert cli.main(["datasets", "create", "shapes", "--classes", ",".join(sample_data.CLASSES)]) == 0
    ds_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["datasets", "upload", ds_id, str(samples / "train")]) == 0
    assert "added 15 image(s)" in capsys.readouterr().out
    assert cli.main(["datasets", "list"]) == 0 and ds_id in capsys.readouterr().out
    assert cli.main(["datasets", "show", ds_id]) == 0
    assert json.loads(capsys.readouterr().out)["image_counts"]["red circle"] == 5

    assert cli.main(["train", ds_id, "--preset", "quick", "--params", '{"lr": 0.01}']) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    model = sdk.zeroshot(list(sample_data.CLASSES))
    t = _play_worker(engine, job_id, model_id=model["id"])
    assert cli.main(["jobs", "wait", job_id, "--timeout", "30"]) == 0
    t.join()
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == model["id"] and "3/3" in out.err
    assert cli.main(["jobs", "list"]) == 0 and job_id in capsys.readouterr().out
    assert cli.main(["jobs", "show", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["lr"] == 0.01
    assert cli.main(["jobs", "cancel", job_id]) == 1  # finished: 409, one line on stderr
    assert "409" in capsys.readouterr().err

    assert cli.main(["classify", model["id"], str(samples / "query"), "--top-k", "2"]) == 0
    assert "red_circle_q0.png: red circle" in capsys.readouterr().out
    assert cli.main(["classify", model["id"], str(samples / "query"), "--threshold", "0.9"]) == 0
    assert "red_circle_q0.png: unknown" in capsys.readouterr().out  # the stand-in's best is 0.6
    assert cli.main(["models", "list"]) == 0 and model["id"] in capsys.readouterr().out
    assert cli.main(["models", "export", model["id"], "-o", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").exists()
    assert cli.main(["models", "evaluate", model["id"], ds_id]) == 0  # the stand-in: always the first class
    report = capsys.readouterr().out
    first = list(sample_data.CLASSES)[0]
    assert "accuracy 0.333 on 15 image(s)" in report and "confusion matrix (rows: true" in report
    row = next(ln for ln in report.splitlines() if ln.startswith(first))  # precision, recall, F1, support
    assert row.split()[-5:-1] == ["0.333", "1.000", "0.500", "5"]
    assert cli.main(["models", "evaluate", model["id"], ds_id, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["per_class"][first]["recall"] == 1.0
    assert ev["per_class"][first]["precision"] == pytest.approx(1 / 3)
    assert cli.main(["datasets", "show", "00000000-0000-0000-0000-000000000000"]) == 1
    assert "404" in capsys.readouterr().err


def test_cli_unreachable_server(capsys) -> None:
    assert cli.main(["datasets", "list", "--url", "http://127.0.0.1:9", "--key", "k"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_zip_upload_layout(sdk: Client, tmp_path: Path) -> None:
    small = sample_data.generate(tmp_path / "small", per_class=3, queries=0, make_zip=True)
    with zipfile.ZipFile(small / "train.zip") as zf:
        assert sorted({n.split("/")[0] for n in zf.namelist()}) == sorted(sample_data.CLASSES)
    ds = sdk.create_dataset("shapes", list(sample_data.CLASSES))
    assert len(sdk.upload(ds, small / "train.zip")["added"]) == 9
