"""Prompt templates, class names and class text embeddings (the one owner for recipe and classifier).

One formatting rule: a template holds the two characters ``{}`` exactly once, and a prompt is the
template with that ``{}`` replaced by the class name (`str.replace`, not `str.format`). Every other
character is literal, braces included: ``"a {{x}} {}"`` gives ``"a {{x}} cat"`` (str.format would
have given ``"a {x} cat"``), and no escaping is ever needed.

Class names and templates are printable text: control characters (tabs, newlines, NUL, ...),
line/paragraph separators and lone surrogates are refused by `check_class_name` /
`check_template` (defined in the torch-free `sparseshot.text_rules`, whose patterns and limits the
service's request schemas use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot.text_rules import (
    DEFAULT_TEMPLATE,
    MAX_CLASS_NAME_CHARS,
    MAX_TEMPLATE_CHARS,
    PLACEHOLDER,
    check_class_name,
    check_template,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "MAX_CLASS_NAME_CHARS",
    "MAX_TEMPLATE_CHARS",
    "check_class_name",
    "check_template",
    "class_text_embeddings",
    "embed_tokens",
    "format_prompts",
    "text_features",
]

def format_prompts(classes: Sequence[str], template: str) -> list[str]:
    """One prompt per class: the template's single "{}" replaced by the class name (module rule)."""
    check_template(template)
    return [template.replace(PLACEHOLDER, c) for c in classes]


def text_features(model: Any, tokens: Tensor) -> Tensor:
    """tokens (C, ctx) -> (C, D) L2-normalised text features, fp32 (gradients as the caller's mode).

    model: an open_clip CLIP (Any: open_clip has no types, and nn.Module hides encode_text)."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def embed_tokens(model: Any, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """(C, D) fp32 L2-normalised embeddings of tokenised prompts, in chunks of `batch_size`."""
    return torch.cat([text_features(model, tokens[i:i + batch_size])
                      for i in range(0, len(tokens), batch_size)])


def class_text_embeddings(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],  # list[str] -> (N, context_length) int64, as BaseModel.tokenizer
    classes: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> Tensor:
    """(C, D) fp32 L2-normalised text embeddings of the class prompts, on `device` (default: the model's).

    Runs without gradients; training computes `text_features` of its tokens with gradients instead.
    """
    if not classes:
        raise ValueError("at least one class is needed")
    if device is None:
        device = next(model.parameters()).device
    tokens = tokenizer(format_prompts(classes, template)).to(device)  # (C, context_length)
    return embed_tokens(model, tokens, batch_size)
