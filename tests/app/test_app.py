"""App-level behaviour: health, readiness, metrics, OpenAPI, auth and problem+json errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db import SessionLocal
from app.services import auth


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_reports_each_check(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = client.app.state.runtime.bases  # type: ignore[attr-defined]
    monkeypatch.setattr(bases, "ready", lambda spec=None: True)
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    checks = {"database": True, "broker": True, "base_model": True}
    assert r.json() == {"status": "ready", "checks": checks, "reasons": {}}

    monkeypatch.setattr(bases, "ready", lambda spec=None: False)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["base_model"] is False and r.json()["reasons"] == {"base_model": "not ready"}


def test_openapi_lists_the_v1_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/{dataset_id}": {"get", "delete"},
        "/v1/datasets/{dataset_id}/images": {"post"},
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/models": {"get"},
        "/v1/models/zeroshot": {"post"},
        "/v1/models/{model_id}": {"get", "delete"},
        "/v1/models/{model_id}/delta": {"get"},
        "/v1/models/{model_id}/classify": {"post"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    for schema in (
        "DatasetCreate",
        "DatasetPublic",
        "JobCreate",
        "JobPublic",
        "ModelPublic",
        "ClassifyPublic",
    ):
        assert schema in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


QUOTA_OPERATIONS = {("post", "/v1/jobs"), ("post", "/v1/datasets/{dataset_id}/images"),
                    ("post", "/v1/models/zeroshot"), ("post", "/v1/models/import")}


def test_openapi_documents_429_where_a_limit_can_refuse(client: TestClient) -> None:
    """429 with the quota body on the operations that add what a per-tenant limit counts (jobs,
    images, models), and on no other."""
    spec = client.get("/openapi.json").json()
    ops = [(m, p, op) for p, item in spec["paths"].items() for m, op in item.items()]
    with_429 = {(m, p) for m, p, op in ops if "429" in op["responses"]}
    assert with_429 == QUOTA_OPERATIONS
    for method, path in QUOTA_OPERATIONS:
        content = spec["paths"][path][method]["responses"]["429"]["content"]
        assert list(content) == ["application/problem+json"]
        assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/QuotaProblem"}
    schema = spec["components"]["schemas"]["QuotaProblem"]
    assert {"type", "title", "status", "detail", "limit", "value", "current"} <= set(schema["required"])
    assert schema["properties"]["value"]["type"] == "integer"


def test_metrics_exposes_requests_jobs_queue_and_cache(client: TestClient, api) -> None:
    ds = api.ready_dataset()
    assert api.job(ds["id"]).status_code == 202
    text = client.get("/metrics").text
    assert 'sparseshot_http_requests_total{method="POST",route="/v1/datasets",status="201"}' in text
    assert "sparseshot_http_request_duration_seconds_bucket" in text
    assert 'sparseshot_jobs{status="queued"} 1.0' in text
    assert "sparseshot_queue_depth 1.0" in text
    assert "sparseshot_model_cache_hits_total" in text and "sparseshot_model_cache_misses_total" in text
    # Raw ids never become label values.
    assert ds["id"] not in text


def test_missing_malformed_unknown_and_revoked_keys_are_401(client: TestClient, engine) -> None:
    with SessionLocal(bind=engine) as session:
        row, key = auth.create_key(session=session, tenant_name="acme")
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer {key[:-2]}xx"},
    ):
        r = client.get("/v1/datasets", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with SessionLocal(bind=engine) as session:
        auth.revoke_key(session=session, key_id=row.id)
    r = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_keys_are_stored_hashed_and_listed(engine) -> None:
    with SessionLocal(bind=engine) as session:
        row, key = auth.create_key(session=session, tenant_name="acme")
        auth.create_key(session=session, tenant_name="other")
        assert key.startswith(f"sk_{row.prefix}_") and key not in row.key_hash
        assert [k.tenant.name for k in auth.list_keys(session=session)] == ["acme", "other"]
        assert len(auth.list_keys(session=session, tenant_name="acme")) == 1
        revoked = auth.revoke_key(session=session, key_id=row.prefix)  # by prefix too
        assert revoked.revoked_at is not None


def test_bad_json_and_wrong_types_are_422_problems(api) -> None:
    r = api.client.post(
        "/v1/datasets", content=b"{not json", headers={**api.headers, "Content-Type": "application/json"}
    )
    body = api.problem(r, 422)
    assert body["errors"]
    r = api.client.post("/v1/datasets", json={"name": 3, "classes": "cat"}, headers=api.headers)
    body = api.problem(r, 422)
    assert any(e["loc"][-1] == "classes" for e in body["errors"])
    r = api.client.post("/v1/datasets", json={"name": "x", "classes": ["a", "a"]}, headers=api.headers)
    assert "unique" in api.problem(r, 422)["detail"]
    r = api.client.post(
        "/v1/datasets", json={"name": "x", "classes": ["a", "b"], "extra": 1}, headers=api.headers
    )
    api.problem(r, 422)
    r = api.client.get("/v1/jobs?status=bogus", headers=api.headers)
    api.problem(r, 422)


def test_unknown_route_is_a_404_problem(api) -> None:
    api.problem(api.client.get("/v1/nothing", headers=api.headers), 404)
