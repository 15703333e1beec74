"""A base model that cannot load: the failure is remembered with a doubling retry delay, the error
says what was tried and what to change, and new jobs are refused (503 + Retry-After) meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import sparseshot
from app.core.config import Settings
from app.runtime import Runtime
from app.services.bases import BaseRegistry
from sparseshot.base import BaseModelError
from tests.app.conftest import Api


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def failing_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """sparseshot.load_base raising (while `state["fail"]`), counted; a fake clock for the backoff."""
    state: dict[str, Any] = {"calls": 0, "fail": True, "clock": Clock()}

    def load(spec: str, device: Any = None, cache_dir: Any = None) -> Any:
        state["calls"] += 1
        if state["fail"]:
            raise BaseModelError(f"weights for {spec} are not in the local cache")
        return object()

    monkeypatch.setitem(vars(sparseshot), "load_base", load)
    yield state


@pytest.fixture
def bases(runtime: Runtime, failing_loads: dict[str, Any]) -> BaseRegistry:
    """The app's base-model registry, its backoff on the fake clock."""
    runtime.bases.clock = failing_loads["clock"]
    return runtime.bases


def test_a_failed_load_is_remembered_and_retried_with_doubling_delays(failing_loads: dict[str, Any]) -> None:
    clock = failing_loads["clock"]
    bases = BaseRegistry(Settings(), clock=clock)
    with pytest.raises(BaseModelError) as first:
        bases.get("ViT-B-16:openai")
    message = str(first.value)
    for needed in ("ViT-B-16:openai", "not in the local cache", "SPARSESHOT_BASE_MODEL", "HF_HUB_OFFLINE",
                   "SPARSESHOT_MODEL_DOWNLOAD_DIR", "tried"):
        assert needed in message, needed
    with pytest.raises(BaseModelError, match="next try in"):
        bases.get("ViT-B-16:openai")  # remembered: no new load
    assert failing_loads["calls"] == 1
    assert bases.unavailable("ViT-B-16:openai") == (bases.error("ViT-B-16:openai"), 30)

    delays = []
    for _ in range(6):  # each due retry fails again: the delay doubles up to the cap
        clock.t += 10_000
        with pytest.raises(BaseModelError):
            bases.get("ViT-B-16:openai")
        delays.append(bases.unavailable("ViT-B-16:openai")[1])  # type: ignore[index]
    assert delays == [60, 120, 240, 480, 600, 600]
    assert failing_loads["calls"] == 7

    failing_loads["fail"] = False
    clock.t += 10_000
    assert bases.get("ViT-B-16:openai") is not None
    assert bases.unavailable("ViT-B-16:openai") is None and bases.error("ViT-B-16:openai") is None


def test_jobs_are_refused_while_the_base_is_unavailable(
    api: Api, settings: Settings, bases: BaseRegistry, failing_loads: dict[str, Any], enqueued: list[str],
) -> None:
    ds = api.ready_dataset()
    with pytest.raises(BaseModelError):
        bases.get(settings.base_model)
    r = api.job(ds["id"])
    body = api.problem(r, 503)
    assert r.headers["Retry-After"] == "30"
    assert "SPARSESHOT_BASE_MODEL" in body["detail"] and body["base_model"] == settings.base_model
    assert api.client.get("/v1/jobs", headers=api.headers).json() == [] and enqueued == []
    ready = api.client.get("/readyz")
    assert ready.status_code == 503 and "SPARSESHOT_BASE_MODEL" in ready.json()["reasons"]["base_model"]

    failing_loads["fail"] = False
    failing_loads["clock"].t += 31
    bases.get(settings.base_model)  # the retry is due and succeeds
    assert api.job(ds["id"]).status_code == 202


def test_serving_answers_the_bases_backoff_as_retry_after(
    api: Api, settings: Settings, bases: BaseRegistry, failing_loads: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """503 while the base cannot load carries the registry's remaining backoff, not
    serving_retry_after_s (which stays for a busy queue)."""
    from app.services import inference
    from sparseshot.delta import SparseDelta

    assert settings.serving_retry_after_s == 1
    clock = failing_loads["clock"]
    zeroshot = {"classes": ["cat", "dog"]}
    r = api.client.post("/v1/models/zeroshot", json=zeroshot, headers=api.headers)
    assert "SPARSESHOT_BASE_MODEL" in api.problem(r, 503)["detail"]
    assert r.headers["Retry-After"] == "30" and failing_loads["calls"] == 1  # the first failure's backoff
    clock.t += 12
    r = api.client.post("/v1/models/zeroshot", json=zeroshot, headers=api.headers)
    assert api.problem(r, 503) and r.headers["Retry-After"] == "18" and failing_loads["calls"] == 1

    empty = SparseDelta.empty({"classes": ["cat", "dog"], "template": "a photo of a {}."})
    with monkeypatch.context() as m:  # a stored model, made without the base
        m.setattr(inference, "zeroshot_delta", lambda **_kw: empty)
        model = api.client.post("/v1/models/zeroshot", json=zeroshot, headers=api.headers).json()
    files = [("files", ("q.png", api.image(), "image/png"))]
    clock.t += 20  # the retry is due: it fails again, and the backoff doubles
    r = api.client.post(f"/v1/models/{model['id']}/classify", files=files, headers=api.headers)
    assert "base model" in api.problem(r, 503)["detail"]
    assert r.headers["Retry-After"] == "60" and failing_loads["calls"] == 2
