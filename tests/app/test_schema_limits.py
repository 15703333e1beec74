"""Limits the API schema repeats from the library (app.schemas must not import torch)."""

from __future__ import annotations

from app import schemas
from sparseshot import prompts


def test_template_limit_matches_the_library() -> None:
    assert schemas.MAX_TEMPLATE_CHARS == prompts.MAX_TEMPLATE_CHARS
    field = schemas.ZeroshotCreate.model_fields["template"]
    assert any(getattr(m, "max_length", None) == prompts.MAX_TEMPLATE_CHARS for m in field.metadata)
