"""Sparse weight gradients for SO training, and a plain attention module that makes them possible.

`PlainAttention` is a drop-in replacement for ``nn.MultiheadAttention(batch_first=True)`` as open_clip
calls it (``attn(q, k, v, need_weights=False, attn_mask=mask)[0]``). It keeps the parameter names
``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, so state-dict keys do not
change, and computes ``F.linear`` (packed q/k/v) -> ``scaled_dot_product_attention`` -> ``out_proj``.
Unlike ``nn.MultiheadAttention`` its output projection is an ordinary ``nn.Linear`` call, so the
input and output projections can be given a custom backward.

`use_plain_attention(model)` swaps every compatible ``nn.MultiheadAttention`` in place. The new module
takes over the *same* Parameter objects (no copy), so outputs are unchanged and an optimizer built
before the swap still holds the right tensors.

LoRA hooks: ``PlainAttention.lora_q``, ``lora_k``, ``lora_v`` are ``None`` or an ``nn.Module`` mapping
the projection input x (N, L, d_model) to (N, L, d_model); its output is added to that projection
(q = x W_qᵀ + b_q + lora_q(x), same for k and v). Adapters set there are registered sub-modules.

`enable_sparse_grads(model, so)`: every ``nn.Linear`` weight and ``PlainAttention.in_proj_weight``
that is one of ``so.sparse_params()`` is computed through `SparseLinearFn`, whose backward returns
the input gradient as usual but, for the weight, only the k entries on the optimizer's current
support S: entry j at flat index S_j = r·in_features + c gets Σₙ gy[n, r]·x[n, c] (fp32), written to
``so.grad_probe(W).grad``. No dense dW is ever formed and ``W.grad`` stays ``None``. Forward keeps
only the k input columns x[:, c] that backward needs (not the whole input, as a dense dW would), so
activation memory is that of a forward + backward with frozen weights.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PlainAttention",
    "SparseGradHandle",
    "SparseLinearFn",
    "enable_sparse_grads",
    "sparse_linear",
    "use_plain_attention",
]

# Upper bound on the elements of one (N, k_chunk) gathered block in the sparse weight gradient.
_GATHER_CHUNK_ELEMS = 1 << 22


class SupportProvider(Protocol):
    """What `enable_sparse_grads` needs from the optimizer (``sparseshot.SO`` provides it)."""

    def support(self, p: Tensor) -> Tensor: ...

    def grad_probe(self, p: Tensor) -> Tensor: ...

    def sparse_params(self) -> list[Tensor]: ...


# --------------------------------------------------------------------------------------------------
# Sparse-gradient linear map
# --------------------------------------------------------------------------------------------------


def _support_grad(gy: Tensor, xs: Tensor, rows: Tensor, cols: Tensor | None) -> Tensor:
    """Σₙ gy[n, rows_j]·x[n, cols_j] for each j, in fp32.

    gy: (N, d_out); rows: (k,). Either xs = the gathered columns x[:, cols] (N, k) and cols None,
    or xs = x (N, d_in) and cols (k,). Works in chunks of k so that at most ~_GATHER_CHUNK_ELEMS
    elements per operand are alive at once. Returns (k,) fp32.
    """
    n, k = gy.shape[0], rows.numel()
    out = torch.empty(k, dtype=torch.float32, device=gy.device)
    step = max(1, _GATHER_CHUNK_ELEMS // max(1, n))
    for s in range(0, k, step):
        e = min(k, s + step)
        a = gy.index_select(1, rows[s:e]).float()  # (N, kc)
        b = (xs[:, s:e] if cols is None else xs.index_select(1, cols[s:e])).float()  # (N, kc)
        out[s:e] = (a * b).sum(0)
    return out


class SparseLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b whose weight gradient is computed only at k entries (rows_j, cols_j) of W.

    Inputs: x (..., d_in); weight (d_out, d_in), detached; bias (d_out,) or None; rows, cols (k,)
    int64 coordinates in `weight`; inside (k,) bool or None (False: the entry belongs to another
    row block of the full matrix and gets 0 here); probe (k,) fp32 leaf receiving the k values.

    What backward needs of x is saved at forward time: only the k gathered columns x[..., cols]
    when k < d_in (a few hundred bytes per token at SO's densities, instead of the whole input
    that a dense weight gradient needs), else x itself.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        rows: Tensor,
        cols: Tensor,
        inside: Tensor | None,
        probe: Tensor,
    ) -> Tensor:
        d_in = weight.shape[1]
        ctx.has_bias = bias is not None
        ctx.gathered = rows.numel() < d_in
        keep = None
        if ctx.needs_input_grad[6]:
            # (N, k) gathered columns or (N, d_in) input.
            keep = x.index_select(-1, cols).reshape(-1, cols.numel()) if ctx.gathered else x.reshape(-1, d_in)
        ctx.save_for_backward(keep, weight, rows, cols, inside)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        keep, weight, rows, cols, inside = ctx.saved_tensors
        grad_x = grad_b = grad_probe = None
        if ctx.needs_input_grad[0]:
            grad_x = gy.matmul(weight.to(gy.dtype))  # (..., d_in)
        gy2 = gy.reshape(-1, weight.shape[0])  # (N, d_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy2.sum(0)
        if ctx.needs_input_grad[6]:
            grad_probe = _support_grad(gy2, keep, rows, None if ctx.gathered else cols)
            if inside is not None:
                grad_probe = grad_probe * inside
        return grad_x, None, grad_b, None, None, None, grad_probe


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    support: Tensor,
    probe: Tensor,
    row_start: int | None = None,
) -> Tensor:
    """x·weightᵀ + bias; backward writes dL/dW[support] (fp32) into probe.grad, never forming dW.

    support: (k,) flat indices into W. row_start None: `weight` is W itself; otherwise `weight` is
    the row block of W starting at row row_start (entries of other blocks get 0 from this call, so
    calls on all blocks of W add up to the full gradient). `weight` is detached here.
    """
    d_out, d_in = weight.shape
    rows = torch.div(support, d_in, rounding_mode="floor")  # (k,) row in W
    cols = support - rows * d_in  # (k,)
    inside = None
    if row_start is not None:
        rows = rows - row_start  # row in this block
        inside = (rows >= 0) & (rows < d_out)
        rows = rows.clamp(0, d_out - 1)
    return SparseLinearFn.apply(x, weight.detach(), bias, rows, cols, inside, probe)


# --------------------------------------------------------------------------------------------------
# Plain attention
# --------------------------------------------------------------------------------------------------

class _SparseRef:
    """The optimizer a patched module reads its support from. copy.deepcopy gives None, so a copy of
    a patched model is an ordinary (dense-gradient) model rather than one feeding the original's
    probes."""

    def __init__(self, so: SupportProvider) -> None:
        self.so = so

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None


class PlainAttention(nn.Module):
    """Multi-head self/cross attention, batch first, with nn.MultiheadAttention's parameter names."""

    lora_q: nn.Module | None
    lora_k: nn.Module | None
    lora_v: nn.Module | None
    in_proj_bias: nn.Parameter | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **kw)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.register_module("lora_q", None)
        self.register_module("lora_k", None)
        self.register_module("lora_v", None)
        self.sparse_ref: _SparseRef | None = None  # set by enable_sparse_grads

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> PlainAttention:
        """A PlainAttention sharing `mha`'s Parameter objects (no copy)."""
        if not _convertible(mha):
            raise ValueError("only batch_first self-attention with equal q/k/v dims can be converted")
        w = mha.in_proj_weight
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads = mha.embed_dim, mha.num_heads
        new.head_dim = mha.embed_dim // mha.num_heads
        new.dropout, new.batch_first = mha.dropout, True
        new.in_proj_weight = w
        new.in_proj_bias = mha.in_proj_bias
        out = nn.Linear(mha.embed_dim, mha.embed_dim, bias=mha.out_proj.bias is not None, device="meta")
        out.weight = mha.out_proj.weight
        out.bias = mha.out_proj.bias
        new.out_proj = out
        new.register_module("lora_q", None)
        new.register_module("lora_k", None)
        new.register_module("lora_v", None)
        new.sparse_ref = None
        new.train(mha.training)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """query/key/value: (N, L, E) / (N, S, E) -> ((N, L, E), attention weights or None)."""
        key = query if key is None else key
        value = key if value is None else value
        q, k, v = self._project(query, key, value)  # (N, L|S, E) each
        n, lq, e = q.shape
        h, hd = self.num_heads, self.head_dim
        q = q.view(n, lq, h, hd).transpose(1, 2)  # (N, H, L, hd)
        k = k.view(n, k.shape[1], h, hd).transpose(1, 2)  # (N, H, S, hd)
        v = v.view(n, v.shape[1], h, hd).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, n, h, lq, k.shape[2], q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            o, weights = _attention_with_weights(q, k, v, mask, p, is_causal and mask is None)
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=is_causal and mask is None)
        o = o.transpose(1, 2).reshape(n, lq, e)  # (N, L, E)
        return self.out_proj(o), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, b, e = self.in_proj_weight, self.in_proj_bias, self.embed_dim
        if query is key and key is value:
            # Self-attention: one packed (N, L, 3E) matmul, then views.
            q, k, v = self._in_proj(query, w, b, None).split(e, dim=-1)
        else:
            bs = (None, None, None) if b is None else b.split(e)
            q = self._in_proj(query, w[:e], bs[0], 0)
            k = self._in_proj(key, w[e:2 * e], bs[1], e)
            v = self._in_proj(value, w[2 * e:], bs[2], 2 * e)
        if self.lora_q is not None:
            q = q + self.lora_q(query)
        if self.lora_k is not None:
            k = k + self.lora_k(key)
        if self.lora_v is not None:
            v = v + self.lora_v(value)
        return q, k, v

    def _in_proj(self, x: Tensor, weight: Tensor, bias: Tensor | None, row_start: int | None) -> Tensor:
        """x·weightᵀ + bias, weight = in_proj_weight's rows from row_start (None: all of it)."""
        ref = self.sparse_ref
        if ref is None:
            return F.linear(x, weight, bias)
        w = self.in_proj_weight
        return sparse_linear(x, weight, bias, ref.so.support(w), ref.so.grad_probe(w), row_start)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.MultiheadAttention's mask conventions -> one float additive mask broadcastable to (N,H,L,S).

    attn_mask: (L, S) or (N·H, L, S), bool (True = masked) or float (added). key_padding_mask:
    (N, S), True = ignore that key.
    """
    mask = None
    if attn_mask is not None:
        mask = _to_additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.view(n, h, lq, lk)
    if key_padding_mask is not None:
        kpm = _to_additive(key_padding_mask, dtype).view(n, 1, 1, lk)
        mask = kpm if mask is None else mask + kpm
    return mask


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _attention_with_weights(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Explicit softmax attention (only for need_weights=True). q: (N,H,L,hd) -> ((N,H,L,hd), (N,H,L,S))."""
    scores = q.matmul(k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, L, S)
    if causal:
        lq, lk = scores.shape[-2:]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(tri, float("-inf"))
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(-1)
    return F.dropout(weights, p).matmul(v), weights


def _convertible(mha: nn.Module) -> bool:
    return (
        isinstance(mha, nn.MultiheadAttention)
        and mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
    )


def use_plain_attention(model: nn.Module) -> nn.Module:
    """Replace every convertible nn.MultiheadAttention in `model` by PlainAttention, in place.

    Parameters are shared, not copied; other attention modules are left as they are.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _convertible(child):
                setattr(parent, name, PlainAttention.from_mha(child))  # type: ignore[arg-type]
    return model


# --------------------------------------------------------------------------------------------------
# Patching a model
# --------------------------------------------------------------------------------------------------


class SparseGradHandle:
    """Returned by `enable_sparse_grads`; `remove()` restores the dense-gradient modules."""

    def __init__(self) -> None:
        self.linears: list[nn.Linear] = []
        self.attentions: list[PlainAttention] = []

    @property
    def num_patched(self) -> int:
        """Number of weight matrices with a sparse backward."""
        return len(self.linears) + len(self.attentions)

    def remove(self) -> None:
        for lin in self.linears:
            lin.__dict__.pop("forward", None)
            lin.__dict__.pop("sparse_ref", None)
        for att in self.attentions:
            att.sparse_ref = None
        self.linears, self.attentions = [], []

    def __enter__(self) -> SparseGradHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _sparse_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Bound to a patched nn.Linear as its `forward` (copy.deepcopy rebinds it to the copy)."""
    ref = self.__dict__.get("sparse_ref")
    if ref is None:
        return F.linear(x, self.weight, self.bias)
    w = self.weight
    return sparse_linear(x, w, self.bias, ref.so.support(w), ref.so.grad_probe(w))


def enable_sparse_grads(model: nn.Module, optimizer: SupportProvider) -> SparseGradHandle:
    """Give every linear weight of `model` that `optimizer` handles sparsely a support-only backward.

    Converts nn.MultiheadAttention to PlainAttention first (parameters shared). The support and the
    probe are looked up at every forward, so refreshed supports are picked up automatically.
    """
    use_plain_attention(model)
    sparse = {id(p) for p in optimizer.sparse_params()}
    handle = SparseGradHandle()
    for module in model.modules():
        if isinstance(module, PlainAttention) and id(module.in_proj_weight) in sparse:
            module.sparse_ref = _SparseRef(optimizer)
            handle.attentions.append(module)
        elif isinstance(module, nn.Linear) and id(module.weight) in sparse:
            # Instance attributes: the bound method shadows nn.Linear.forward; remove() deletes both.
            module.__dict__["sparse_ref"] = _SparseRef(optimizer)
            module.__dict__["forward"] = MethodType(_sparse_linear_forward, module)
            handle.linears.append(module)
    return handle
