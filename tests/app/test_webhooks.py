"""Job webhooks against a real HTTP receiver (a threaded http.server on 127.0.0.1): the target
checks, the signature, retries with backoff, no redirects, the delivery log, the secret."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.runtime import Runtime
from app.webhooks import dispatch, signing
from tests.app.conftest import Api
from tests.fakes import Receiver, RecordingQueue


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(*answers: int) -> Receiver:
        made.append(Receiver(*answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def open_settings(settings: Settings) -> Settings:
    """Loopback receivers allowed (the test's own server), no wait between attempts."""
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_backoff_s": 0.0,
                                       "webhook_max_attempts": 3, "webhook_timeout_s": 5.0})


@pytest.fixture
def hook_api(open_settings: Settings, headers: dict[str, str]) -> Iterator[Api]:
    with TestClient(create_app(open_settings, queue=RecordingQueue()), raise_server_exceptions=False) as c:
        yield Api(c, headers)


def _runtime(api: Api) -> Runtime:
    runtime: Runtime = api.client.app.state.runtime  # type: ignore[attr-defined]
    return runtime


def _ended_job(api: Api, url: str) -> dict[str, Any]:
    """A job with `url` as its webhook, cancelled while queued (a terminal state)."""
    ds = api.ready_dataset()
    r = api.job(ds["id"], webhook_url=url)
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == url
    r = api.client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=api.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    return dict(r.json())


def _deliveries(api: Api, job_id: str) -> list[dict[str, Any]]:
    r = api.client.get(f"/v1/jobs/{job_id}/deliveries", headers=api.headers)
    assert r.status_code == 200, r.text
    return list(r.json())


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.10/",
    "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/", "http://[fe80::1]/",
    "http://100.64.0.1/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/",
])
def test_private_loopback_and_link_local_targets_are_refused_by_default(api: Api, url: str) -> None:
    ds = api.ready_dataset()
    body = api.problem(api.job(ds["id"], webhook_url=url), 422)
    assert "SPARSESHOT_WEBHOOK_ALLOW_PRIVATE" in body["detail"]
    assert api.client.get("/v1/jobs", headers=api.headers).json() == []  # no job created


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "file:///etc/passwd", "example.com/hook",
                                 "http:///nohost", "https://user:pw@example.com/hook"])
def test_non_http_targets_are_refused(hook_api: Api, url: str) -> None:
    ds = hook_api.ready_dataset()
    hook_api.problem(hook_api.job(ds["id"], webhook_url=url), 422)


def test_signed_delivery_retried_after_a_500_and_logged(hook_api: Api, receiver_factory: Any) -> None:
    receiver = receiver_factory(500, 204)
    job = _ended_job(hook_api, receiver.url)
    [pending] = _deliveries(hook_api, job["id"])
    assert pending["state"] == "pending" and pending["attempts"] == [] and pending["event"] == "job.cancelled"

    assert dispatch.deliver_due(_runtime(hook_api)) == 1  # answered 500: retried (backoff 0 here)
    [after_one] = _deliveries(hook_api, job["id"])
    assert after_one["state"] == "pending"
    assert after_one["attempts"][0]["status_code"] == 500 and after_one["attempts"][0]["error"] == "HTTP 500"
    assert dispatch.deliver_due(_runtime(hook_api)) == 1
    assert dispatch.deliver_due(_runtime(hook_api)) == 0  # delivered: nothing due any more

    [done] = _deliveries(hook_api, job["id"])
    assert done["state"] == "delivered" and done["delivered_at"] and done["next_attempt_at"] is None
    assert [(a["attempt"], a["status_code"], a["error"]) for a in done["attempts"]] == [
        (1, 500, "HTTP 500"), (2, 204, None)]
    assert all(a["duration_s"] >= 0 and a["at"] for a in done["attempts"])

    secret = hook_api.client.get("/v1/webhook-secret", headers=hook_api.headers).json()["secret"]
    assert len(receiver.requests) == 2
    bodies = {r["body"] for r in receiver.requests}
    assert len(bodies) == 1  # every attempt sends the same bytes
    for req in receiver.requests:
        h = req["headers"]
        assert h["Content-Type"] == "application/json" and h["X-SparseShot-Event"] == "job.cancelled"
        assert h["X-SparseShot-Delivery"] == done["id"]
        assert signing.verify(secret, timestamp=h["X-SparseShot-Timestamp"],
                              signature_header=h["X-SparseShot-Signature"], body=req["body"])
        assert not signing.verify("whsec_other", timestamp=h["X-SparseShot-Timestamp"],
                                  signature_header=h["X-SparseShot-Signature"], body=req["body"])
        assert not signing.verify(secret, timestamp=h["X-SparseShot-Timestamp"],
                                  signature_header=h["X-SparseShot-Signature"], body=req["body"] + b" ")
    payload = json.loads(receiver.requests[0]["body"])
    assert payload["event"] == "job.cancelled" and payload["delivery_id"] == done["id"]
    assert payload["job"]["id"] == job["id"] and payload["job"]["status"] == "cancelled"
    assert payload["model_id"] is None and payload["occurred_at"]


def test_out_of_attempts_fails_and_redirects_are_not_followed(hook_api: Api, receiver_factory: Any) -> None:
    receiver = receiver_factory(302)
    job = _ended_job(hook_api, receiver.url)
    for _ in range(5):
        dispatch.deliver_due(_runtime(hook_api))
    [failed] = _deliveries(hook_api, job["id"])
    assert failed["state"] == "failed" and len(failed["attempts"]) == 3  # webhook_max_attempts
    assert all(a["status_code"] == 302 and "redirects are not followed" in a["error"]
               for a in failed["attempts"])
    assert [r["path"] for r in receiver.requests] == ["/hook"] * 3  # never /elsewhere


def test_a_target_that_turns_private_is_refused_at_delivery(hook_api: Api, receiver_factory: Any) -> None:
    receiver = receiver_factory(200)
    job = _ended_job(hook_api, receiver.url)  # accepted while private targets were allowed
    _runtime(hook_api).settings.webhook_allow_private = False  # as when a name re-resolves inward
    dispatch.deliver_due(_runtime(hook_api))
    [d] = _deliveries(hook_api, job["id"])
    assert d["attempts"][0]["status_code"] is None and d["attempts"][0]["error"].startswith("refused")
    assert receiver.requests == []


def test_a_dead_receiver_is_an_error_in_the_log(hook_api: Api, receiver_factory: Any) -> None:
    receiver = receiver_factory(200)
    url = receiver.url
    receiver.close()  # nothing listens there now
    job = _ended_job(hook_api, url)
    dispatch.deliver_due(_runtime(hook_api))
    [d] = _deliveries(hook_api, job["id"])
    assert d["state"] == "pending" and d["attempts"][0]["status_code"] is None
    assert "Connect" in d["attempts"][0]["error"]


def test_the_dispatcher_thread_delivers(hook_api: Api, receiver_factory: Any) -> None:
    receiver = receiver_factory(200)
    job = _ended_job(hook_api, receiver.url)
    runtime = _runtime(hook_api)
    runtime.settings.webhook_poll_s = 0.05
    sender = dispatch.Dispatcher(runtime).start()
    try:
        deadline = time.monotonic() + 30
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sender.stop(timeout=10)
    assert len(receiver.requests) == 1
    assert _deliveries(hook_api, job["id"])[0]["state"] == "delivered"


def test_jobs_without_a_webhook_have_no_deliveries_and_others_are_hidden(
    hook_api: Api, make_key: Any, receiver_factory: Any,
) -> None:
    ds = hook_api.ready_dataset()
    plain = hook_api.job(ds["id"]).json()
    hook_api.client.post(f"/v1/jobs/{plain['id']}/cancel", headers=hook_api.headers)
    assert _deliveries(hook_api, plain["id"]) == [] and plain["webhook_url"] is None
    job = _ended_job(hook_api, receiver_factory(200).url)
    other = make_key("other-tenant")
    assert hook_api.client.get(f"/v1/jobs/{job['id']}/deliveries", headers=other).status_code == 404


def test_secret_is_stable_until_rotated_and_per_tenant(api: Api, make_key: Any) -> None:
    first = api.client.get("/v1/webhook-secret", headers=api.headers).json()["secret"]
    assert first.startswith("whsec_") and len(first) == len("whsec_") + 64
    assert api.client.get("/v1/webhook-secret", headers=api.headers).json()["secret"] == first
    rotated = api.client.post("/v1/webhook-secret", headers=api.headers).json()["secret"]
    assert rotated != first
    assert api.client.get("/v1/webhook-secret", headers=api.headers).json()["secret"] == rotated
    other = api.client.get("/v1/webhook-secret", headers=make_key("other-tenant")).json()["secret"]
    assert other not in (first, rotated)
    assert api.client.get("/v1/webhook-secret").status_code == 401


def test_backoff_doubles_up_to_its_cap(settings: Settings) -> None:
    s = settings.model_copy(update={"webhook_backoff_s": 10.0, "webhook_backoff_max_s": 60.0})
    assert [dispatch.backoff_s(s, n) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, 60.0]
