"""OpenAPI documentation of the error answers: every status an operation can give, with the
RFC 7807 body (`application/problem+json`, schema `Problem`) that app.errors sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from app.errors import PROBLEM_MEDIA_TYPE


class Problem(BaseModel):
    """An error (RFC 7807). Some problems add members: `errors` (422), `rejected` (uploads)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://sparseshot.dev/problems/not-found"])
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = Field(default=None, description="Validation errors (at most 20).")
    errors_total: int | None = Field(default=None, description="Set when more errors were found than listed.")
    rejected: list[dict[str, Any]] | None = Field(default=None, description="Files refused, with the reason.")


class QuotaProblem(Problem):
    """429: a per-tenant limit (app/quotas.py) is reached; the body says which, its value and the
    current usage. No `Retry-After`: room comes back when the tenant's jobs end or it deletes things."""

    limit: str = Field(description="The limit's name.", examples=["max_queued_jobs"])
    value: int = Field(description="The tenant's value of the limit.")
    current: int = Field(description="The usage counted against it (for max_steps_per_job: the job's steps).")


_WHY = {
    400: "The body cannot be parsed (not JSON, not UTF-8, a broken multipart form).",
    401: "No, a malformed, unknown or revoked API key (`Authorization: Bearer <key>`).",
    404: "No such resource for this tenant.",
    409: "The resource is not in a state that allows this.",
    413: "The request body, a file, an archive or the number of files is over a limit.",
    422: "The input is invalid (`errors` lists the fields).",
    429: "A per-tenant limit is reached (`limit`, `value`, `current` say which).",
    500: "An unexpected error (a bug); the connection stays usable.",
    503: "A dependency (database, queue, base model) is unavailable; see `Retry-After`.",
    507: "Storage is full; nothing was stored.",
}
# Every operation's; 429 only on those that count against a limit (QUOTA_RESPONSES on the route).
API_STATUSES = (400, 401, 404, 409, 413, 422, 500, 503, 507)
_MODELS: dict[int, type[Problem]] = {429: QuotaProblem}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or route: each status documented with the problem body."""
    return {s: {"model": _MODELS.get(s, Problem), "description": _WHY[s]} for s in statuses or API_STATUSES}


# The operations that add what a limit counts: jobs, images, models (app/quotas.py).
QUOTA_RESPONSES = problem_responses(429)


def install_openapi(app: FastAPI) -> None:
    """Error responses are documented as `application/problem+json` only (FastAPI would say
    `application/json` for every `model`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary,
                               description=app.description, routes=app.routes)
            for operation in (op for path in spec["paths"].values() for op in path.values()):
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status[0] in "45" and "application/json" in content and _is_problem(content):
                        content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
            _document_choices(spec, app)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_problem(content: dict[str, Any]) -> bool:
    ref = content["application/json"].get("schema", {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1] in {Problem.__name__, *(m.__name__ for m in _MODELS.values())}


def _document_choices(spec: dict[str, Any], app: FastAPI) -> None:
    """What the models cannot say: the base models served here, and an upload's two forms
    (`files` with `label`, or one `archive`)."""
    settings = app.state.runtime.settings
    served = {"type": "string", "enum": [settings.base_model, *settings.allowed_base_models]}
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("JobCreate", "ZeroshotCreate"):
        prop = schemas.get(name, {}).get("properties", {}).get("base_model")
        if prop is not None:
            prop["anyOf"] = [served, {"type": "null"}]
    upload = schemas.get("Body_add_images_v1_datasets__dataset_id__images_post")
    if upload is not None:
        upload["oneOf"] = [{"required": ["files", "label"]}, {"required": ["archive"]}]
        upload["properties"]["files"]["minItems"] = 1
