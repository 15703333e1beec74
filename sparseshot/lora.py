"""LoRA adapters on the q, k, v projections of CLIP attention (the CLIP-LoRA baseline).

An adapter adds ``scale · B A dropout(x)`` to a projection, with A (r, d_in), B (d_out, r),
scale = alpha / sqrt(r) and B initialised to zero (so an adapted model starts equal to its base).
Adapters hang on the ``lora_q`` / ``lora_k`` / ``lora_v`` hooks of `PlainAttention`
(sparseshot.sparse_grad): q = x W_qᵀ + b_q + lora_q(x), likewise k and v.

After training, `lora_delta_parts` gives the low-rank updates of ``in_proj_weight`` row blocks
(q rows [0, E), k rows [E, 2E), v rows [2E, 3E)) for ``SparseDelta.add_lowrank``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparseshot.sparse_grad import PlainAttention, use_plain_attention

__all__ = ["LoRAAdapter", "add_lora", "lora_delta_parts", "remove_lora", "select_blocks", "tower_depths"]

_HOOKS = ("lora_q", "lora_k", "lora_v")
# Tower attribute paths of an open_clip CLIP model: name prefix -> attribute chain.
_TOWERS = {"vision": ("visual", "transformer"), "text": ("transformer",)}
ENCODERS = ("vision", "text", "both")


class LoRAAdapter(nn.Module):
    """x (..., d_in) -> scale · dropout(x) Aᵀ Bᵀ (..., d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.scale = alpha / math.sqrt(rank)
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.linear(self.dropout(x), self.A.to(x.dtype))  # (..., r)
        return nn.functional.linear(h, self.B.to(x.dtype)) * self.scale  # (..., d_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:.4g}"


def _tower_blocks(model: nn.Module, encoder: str) -> tuple[str, Sequence[nn.Module]]:
    """(parameter-name prefix of the blocks, list of residual blocks) of one tower."""
    obj: object = model
    for attr in _TOWERS[encoder]:
        obj = getattr(obj, attr, None)
        if obj is None:
            raise ValueError(f"model has no {'.'.join(_TOWERS[encoder])} (not an open_clip CLIP?)")
    blocks = getattr(obj, "resblocks", None)
    if blocks is None:
        raise ValueError(f"{'.'.join(_TOWERS[encoder])} has no resblocks")
    return ".".join(_TOWERS[encoder]) + ".resblocks", list(blocks)


def tower_depths(model: nn.Module) -> dict[str, int]:
    """Number of residual blocks of each tower of an open_clip CLIP: {"vision": n, "text": m}."""
    return {tower: len(_tower_blocks(model, tower)[1]) for tower in _TOWERS}


def select_blocks(
    model: nn.Module, encoder: str = "both", positions: str | Sequence[int] = "all"
) -> list[tuple[str, nn.Module]]:
    """The residual blocks to adapt, as (name prefix "visual.transformer.resblocks.3", block).

    encoder: "vision" | "text" | "both". positions: "all" or block indices (negative counts from
    the end) applied to each selected tower; an index outside a tower is an error.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    chosen: list[tuple[str, nn.Module]] = []
    for tower in (("vision", "text") if encoder == "both" else (encoder,)):
        prefix, blocks = _tower_blocks(model, tower)
        n = len(blocks)
        if isinstance(positions, str):
            if positions != "all":
                raise ValueError(f"positions must be 'all' or block indices, got {positions!r}")
            idx = list(range(n))
        else:
            bad = [i for i in positions if not -n <= i < n]
            if bad:
                raise ValueError(f"block positions {bad} out of range for the {tower} tower ({n} blocks)")
            idx = sorted({i % n for i in positions})
        chosen += [(f"{prefix}.{i}", blocks[i]) for i in idx]
    return chosen


def add_lora(
    model: nn.Module,
    *,
    rank: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
    encoder: str = "both",
    positions: str | Sequence[int] = "all",
) -> list[nn.Parameter]:
    """Put LoRA adapters on q, k, v of the selected blocks' attention; returns their parameters.

    The model's own weights are left untouched (and untrained); attention modules are converted to
    PlainAttention first if needed.
    """
    use_plain_attention(model)
    params: list[nn.Parameter] = []
    for prefix, block in select_blocks(model, encoder, positions):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, PlainAttention):
            raise ValueError(f"{prefix}.attn is not a PlainAttention; cannot attach LoRA")
        e = attn.embed_dim
        dev = attn.in_proj_weight.device
        for hook in _HOOKS:
            adapter = LoRAAdapter(e, e, rank, alpha, dropout, device=dev)
            setattr(attn, hook, adapter)
            params += [adapter.A, adapter.B]
    return params


def _adapted_attentions(model: nn.Module):
    """(name of the attention module, module) for every attention with at least one adapter."""
    for name, module in model.named_modules():
        if any(isinstance(getattr(module, h, None), LoRAAdapter) for h in _HOOKS):
            yield name, module


def lora_delta_parts(model: nn.Module) -> list[tuple[str, int, Tensor, Tensor, float]]:
    """(param_name, row_start, B (rows × r), A (r × cols), scale) for each adapter, detached on CPU.

    param_name is the attention's ``in_proj_weight``; q/k/v adapters cover rows from 0, E and 2E.
    """
    parts = []
    for name, attn in _adapted_attentions(model):
        e = attn.embed_dim
        for i, hook in enumerate(_HOOKS):
            adapter = getattr(attn, hook)
            if isinstance(adapter, LoRAAdapter):
                parts.append((f"{name}.in_proj_weight", i * e, adapter.B.detach().float().cpu(),
                              adapter.A.detach().float().cpu(), adapter.scale))
    return parts


def remove_lora(model: nn.Module) -> None:
    """Detach every adapter (the attention modules return to their plain behaviour)."""
    for _, attn in list(_adapted_attentions(model)):
        for hook in _HOOKS:
            setattr(attn, hook, None)
