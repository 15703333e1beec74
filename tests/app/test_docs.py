"""Interactive docs and the console work offline; every operation is documented with working examples."""

from __future__ import annotations

import re

import pytest

_URL_ATTR = re.compile(r"""(?:src|href|spec-url|url)\s*[=:]\s*["']([^"']+)["']""")


def _local_refs(html: str) -> list[str]:
    """Every URL the page loads, asserted to be on this server (no scheme, no host)."""
    refs = _URL_ATTR.findall(html)
    assert refs, html
    external = [r for r in refs if re.match(r"^(?:[a-z]+:)?//", r)]
    assert external == [], external
    return [r for r in refs if not r.startswith("#")]


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/"])
def test_pages_load_only_local_assets(client, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text
    for ref in _local_refs(r.text):
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.content, ref


def test_vendored_bundles_ship_with_their_licences(client) -> None:
    for path in (
        "/static/vendor/swagger-ui/LICENSE",
        "/static/vendor/swagger-ui/NOTICE",
        "/static/vendor/redoc/LICENSE",
    ):
        r = client.get(path)
        assert r.status_code == 200 and ("License" in r.text or "Copyright" in r.text), path
    js = client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in js.text
    assert "Redoc" in client.get("/static/vendor/redoc/redoc.standalone.js").text
    api_problem = client.get("/static/../app/main.py")
    assert api_problem.status_code == 404


def test_every_operation_has_a_summary_and_description(client) -> None:
    spec = client.get("/openapi.json").json()
    ops = [(m, p, op) for p, item in spec["paths"].items() for m, op in item.items()]
    assert len(ops) >= 20
    for method, path, op in ops:
        assert op.get("summary") and op.get("description"), (method, path)
        assert op["summary"] != op["description"], (method, path)


def test_request_examples_work_as_sent(client, api) -> None:
    """The body examples shown by /docs are accepted (the job's once its dataset id is real)."""
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("DatasetCreate", "JobCreate", "ZeroshotCreate", "ImagePatch"):
        assert schemas[name].get("examples"), name
    [ds_example] = schemas["DatasetCreate"]["examples"]
    r = client.post("/v1/datasets", json=ds_example, headers=api.headers)
    assert r.status_code == 201, r.text
    ds = r.json()
    for label, colour in zip(ds["classes"], ((200, 0, 0), (0, 0, 200)), strict=False):
        assert api.upload(ds["id"], label, api.image(colour)).status_code == 201
    [job_example] = schemas["JobCreate"]["examples"]
    assert "base_model" not in job_example
    r = client.post("/v1/jobs", json={**job_example, "dataset_id": ds["id"]}, headers=api.headers)
    assert r.status_code == 202, r.text
    assert r.json()["params"]["n_iters"] == job_example["params"]["n_iters"]
    [patch_example] = schemas["ImagePatch"]["examples"]
    assert patch_example["label"] in ds["classes"]
    [zs_example] = schemas["ZeroshotCreate"]["examples"]
    r = client.post("/v1/models/zeroshot", json=zs_example, headers=api.headers)
    assert r.status_code == 201, r.text
