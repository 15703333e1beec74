"""What user text may reach a prompt: class names and templates (the one owner of these rules).

Torch-free on purpose: the service's request schemas (`app/schemas.py`) take their limits and
patterns from here, so a name the API accepts is always one the recipe and the classifier accept
(`sparseshot.prompts` checks with the same functions).

Refused everywhere: control characters (Unicode category Cc: C0, DEL, C1 — PostgreSQL cannot even
store NUL), the line and paragraph separators (Zl, Zp) and lone surrogates (Cs).
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = [
    "DEFAULT_TEMPLATE", "MAX_CLASS_NAME_CHARS", "MAX_TEMPLATE_CHARS", "NAME_PATTERN", "PLACEHOLDER",
    "TEMPLATE_PATTERN", "bad_char", "check_class_name", "check_template",
]

DEFAULT_TEMPLATE = "a photo of a {}."
PLACEHOLDER = "{}"
MAX_CLASS_NAME_CHARS = 200
MAX_TEMPLATE_CHARS = 300
_REFUSED_CATEGORIES = {"Cc", "Zl", "Zp", "Cs"}
# The refused characters as a regex class body, written out (not as escapes) for U+2028/U+2029 so
# that every engine reading the OpenAPI pattern (Python, Rust, ECMA) sees the same class.
# Surrogates are left out: they cannot reach a schema (not valid UTF-8, refused by the JSON parser).
_REFUSED_CLASS = r"\x00-\x1f\x7f-\x9f" + "\u2028\u2029"
# A name (dataset, model, class): no refused character and at least one that is not whitespace.
NAME_PATTERN = f"^[^{_REFUSED_CLASS}]*[^\\s{_REFUSED_CLASS}][^{_REFUSED_CLASS}]*$"
# A template as the API takes it: exactly one "{}" and no other braces (a subset of what
# `check_template` allows, where other braces are literal text).
TEMPLATE_PATTERN = f"^[^{{}}{_REFUSED_CLASS}]*\\{{\\}}[^{{}}{_REFUSED_CLASS}]*$"


def bad_char(text: str) -> str | None:
    """The first refused character of `text`, or None."""
    for ch in text:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return ch
    return None


def check_class_name(name: Any) -> str:
    """`name` if it is a usable class name, else ValueError: a non-blank string of at most
    MAX_CLASS_NAME_CHARS characters without a refused character."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class names must be non-empty strings, got {name!r}")
    if len(name) > MAX_CLASS_NAME_CHARS:
        raise ValueError(f"class name of {len(name)} characters, over the limit of {MAX_CLASS_NAME_CHARS}")
    bad = bad_char(name)
    if bad is not None:
        raise ValueError(f"class name {name!r} contains the control character {bad!r}")
    return name


def check_template(template: Any) -> str:
    """`template` if it is a usable prompt template (exactly one "{}", printable), else ValueError."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ValueError(f"template must be a string with exactly one '{{}}' for the class name, "
                         f"got {template!r}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"template of {len(template)} characters, over the limit of {MAX_TEMPLATE_CHARS}")
    bad = bad_char(template)
    if bad is not None:
        raise ValueError(f"template {template!r} contains the control character {bad!r}")
    return template
