"""Limits the API schema repeats from the library (app.schemas must not import torch)."""

from __future__ import annotations

from app import schemas
from sparseshot import prompts


def test_template_limit_matches_the_library() -> None:
    assert schemas.MAX_TEMPLATE_CHARS == prompts.MAX_TEMPLATE_CHARS
    field = schemas.ZeroshotCreate.model_fields["template"]
    assert any(getattr(m, "max_length", None) == prompts.MAX_TEMPLATE_CHARS for m in field.metadata)


def test_job_params_schema_is_the_recipe_configs(client) -> None:
    from sparseshot import configs

    spec = client.get("/openapi.json").json()
    params = spec["components"]["schemas"]["JobCreate"]["properties"]["params"]
    by_title = {s["title"]: {k: v for k, v in s.items() if k != "title"} for s in params["anyOf"]}
    assert by_title == {"SO params": configs.params_json_schema("so"),
                        "LORA params": configs.params_json_schema("lora")}
