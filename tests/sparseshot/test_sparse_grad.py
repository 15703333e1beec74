"""PlainAttention equals nn.MultiheadAttention; sparse weight gradients equal dense autograd on S."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot import sparse_grad
from sparseshot.optim import SO
from sparseshot.sparse_grad import (
    PlainAttention,
    enable_sparse_grads,
    sparse_linear,
    use_plain_attention,
)

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}


def make_so(params: list[Tensor], density: float = 0.05, seed: int = 0, **kw: object) -> SO:
    return SO(params, lr=1e-2, density=density, generator=torch.Generator().manual_seed(seed), **kw)


def tiny_clip() -> nn.Module:
    model = open_clip.CLIP(**copy.deepcopy(TINY_CFG))
    model.eval()
    return model


def trainable_matrices(model: nn.Module) -> list[Tensor]:
    """The paper's setting: attention in/out projections and MLP weights of every block."""
    suffixes = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(suffixes))
        if p.requires_grad:
            out.append(p)
    return out


def clip_loss(model: nn.Module, images: Tensor, text: Tensor, labels: Tensor) -> Tensor:
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    txt = F.normalize(model.encode_text(text), dim=-1)  # (C, D)
    return F.cross_entropy(10.0 * img @ txt.t(), labels)


def batch() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    text = torch.randint(1, 999, (4, 16), generator=gen)
    text[:, 9] = 999  # the highest id marks the end of text (argmax pooling)
    return images, text, torch.tensor([0, 3, 1])


# ---------------------------------------------------------------------------------- PlainAttention


def _pair(e: int = 16, h: int = 4) -> tuple[nn.MultiheadAttention, PlainAttention]:
    mha = nn.MultiheadAttention(e, h, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha, PlainAttention.from_mha(copy.deepcopy(mha))


def _masks(n: int, h: int, lq: int) -> list[dict]:
    causal = torch.full((lq, lq), float("-inf")).triu_(1)
    boolean = torch.rand(lq, lq) > 0.7
    boolean.fill_diagonal_(False)
    pad = torch.zeros(n, lq)
    pad[0, -2:] = float("-inf")
    bool_pad = torch.zeros(n, lq, dtype=torch.bool)
    bool_pad[0, -2:] = True
    per_head = torch.randn(n * h, lq, lq)
    return [{}, {"attn_mask": causal}, {"attn_mask": boolean}, {"key_padding_mask": bool_pad},
            {"attn_mask": per_head}, {"attn_mask": causal, "key_padding_mask": pad}]


@pytest.mark.parametrize("case", range(6))
def test_plain_attention_matches_mha_self(case: int) -> None:
    mha, plain = _pair()
    x = torch.randn(2, 7, 16)
    kw = _masks(2, 4, 7)[case]
    ref = mha(x, x, x, need_weights=False, **kw)[0]
    out, w = plain(x, x, x, need_weights=False, **kw)
    assert w is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_plain_attention_cross_and_weights() -> None:
    mha, plain = _pair()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    v = torch.randn(2, 9, 16)
    ref, ref_w = mha(q, kv, v, need_weights=True)
    out, w = plain(q, kv, v, need_weights=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)


def test_use_plain_attention_on_clip_keeps_params_and_outputs() -> None:
    model = tiny_clip()
    images, text, _ = batch()
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(images), model.encode_text(text)
    keys = list(model.state_dict())
    params = {id(p) for p in model.parameters()}
    use_plain_attention(model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert sum(isinstance(m, PlainAttention) for m in model.modules()) == 4
    assert list(model.state_dict()) == keys
    assert {id(p) for p in model.parameters()} == params  # same Parameter objects
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(text), ref_t, atol=1e-5, rtol=1e-5)


def test_lora_hooks_add_to_projections() -> None:
    _, plain = _pair()
    x = torch.randn(2, 5, 16)
    merged = copy.deepcopy(plain)
    for i, name in enumerate(("lora_q", "lora_k", "lora_v")):
        adapter = nn.Linear(16, 16, bias=False)  # x -> x·Aᵀ, added to that projection
        setattr(plain, name, adapter)
        with torch.no_grad():
            merged.in_proj_weight[16 * i:16 * (i + 1)] += adapter.weight
    assert "lora_k.weight" in plain.state_dict()
    torch.testing.assert_close(plain(x)[0], merged(x)[0], atol=1e-5, rtol=1e-5)
    plain.lora_q = plain.lora_k = plain.lora_v = None
    assert "lora_k.weight" not in plain.state_dict()


# ------------------------------------------------------------------------------- sparse gradients


@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 5)])
@pytest.mark.parametrize("support", [[0, 3, 11, 12, 20, 34], [3, 12, 34]])  # k >= d_in, k < d_in
def test_sparse_linear_grads_match_dense(
    shape: tuple[int, ...], support: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparse_grad, "_GATHER_CHUNK_ELEMS", 8)  # force several chunks
    w = torch.randn(7, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    x = torch.randn(*shape, requires_grad=True)
    gy = torch.randn(*shape[:-1], 7)
    (F.linear(x, w, b) * gy).sum().backward()
    dense_x, dense_w, dense_b = x.grad.clone(), w.grad.clone(), b.grad.clone()
    x.grad = b.grad = w.grad = None

    s = torch.tensor(support)
    probe = torch.zeros(len(support), requires_grad=True)
    y = sparse_linear(x, w, b, s, probe)
    torch.testing.assert_close(y, F.linear(x, w, b))
    (y * gy).sum().backward()
    assert w.grad is None
    assert probe.grad.dtype == torch.float32
    torch.testing.assert_close(probe.grad, dense_w.flatten()[s])
    torch.testing.assert_close(x.grad, dense_x)
    torch.testing.assert_close(b.grad, dense_b)


def test_sparse_linear_saves_only_gathered_columns() -> None:
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(10, 32)
    saved: list[torch.Size] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_linear(x, w, None, torch.tensor([5, 900, 2000]), torch.zeros(3, requires_grad=True))
    assert torch.Size([10, 3]) in saved  # x[:, cols], not x
    assert all(s.numel() < x.numel() or s == w.shape for s in saved)


def test_sparse_linear_bf16_probe_is_fp32() -> None:
    w = torch.randn(8, 6).bfloat16()
    x = torch.randn(10, 6).bfloat16()
    support, probe = torch.tensor([1, 7, 40]), torch.zeros(3, requires_grad=True)
    sparse_linear(x, w, None, support, probe).float().sum().backward()
    expected = (torch.ones(10, 8) .t() @ x.float()).flatten()[support]
    assert probe.grad.dtype == torch.float32
    torch.testing.assert_close(probe.grad, expected, atol=1e-2, rtol=1e-2)


def _dense_grads(model: nn.Module, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    images, text, labels = batch()
    loss = clip_loss(model, images, text, labels)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), list(grads)


def test_patched_clip_matches_dense_autograd() -> None:
    model = tiny_clip()
    use_plain_attention(model)
    params = trainable_matrices(model)
    assert len(params) == 16
    ref_loss, dense = _dense_grads(model, params)

    so = make_so(params)
    handle = enable_sparse_grads(model, so)
    assert handle.num_patched == 16
    images, text, labels = batch()
    loss = clip_loss(model, images, text, labels)
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    for p, g in zip(params, dense, strict=True):
        assert p.grad is None
        torch.testing.assert_close(so.grad_probe(p).grad, g.flatten()[so.support(p)], atol=1e-6, rtol=1e-5)

    handle.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    loss2, dense2 = _dense_grads(model, params)
    torch.testing.assert_close(loss2, ref_loss)
    torch.testing.assert_close(dense2[0], dense[0])


def test_enable_converts_mha_and_follows_refreshed_support() -> None:
    model = tiny_clip()  # still nn.MultiheadAttention: enable_sparse_grads converts it
    params = trainable_matrices(model)
    so = make_so(params, seed=1, refresh_every=1)
    handle = enable_sparse_grads(model, so)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    images, text, labels = batch()
    clip_loss(model, images, text, labels).backward()
    so.step()  # redraws every support: new probe objects, picked up at the next forward
    so.zero_grad()
    clip_loss(model, images, text, labels).backward()
    handle.remove()
    _, dense = _dense_grads(model, params)
    for p, g in zip(params, dense, strict=True):
        torch.testing.assert_close(so.grad_probe(p).grad, g.flatten()[so.support(p)], atol=1e-6, rtol=1e-5)


def test_cross_attention_in_proj_slices_add_up() -> None:
    _, plain = _pair()
    w = plain.in_proj_weight
    q, k, v = (torch.randn(2, n, 16) for n in (3, 6, 6))
    gy = torch.randn(2, 3, 16)
    (plain(q, k, v)[0] * gy).sum().backward()
    dense = w.grad.clone()
    w.grad = None

    so = make_so([w], density=0.1)
    enable_sparse_grads(plain, so)
    (plain(q, k, v)[0] * gy).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(so.grad_probe(w).grad, dense.flatten()[so.support(w)], atol=1e-6, rtol=1e-5)


def test_so_steps_with_sparse_backward_equal_dense_fallback() -> None:
    """Same SO run twice: probes filled by the sparse backward vs p.grad gathered at S."""
    models = [use_plain_attention(tiny_clip()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_so(trainable_matrices(m), refresh_every=2, seed=5) for m in models]
    start = [p.detach().clone() for p in opts[0].sparse_params()]
    handle = enable_sparse_grads(models[0], opts[0])
    images, text, labels = batch()
    for _ in range(5):  # two refreshes
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            clip_loss(model, images, text, labels).backward()
            opt.step()
    assert all(p.grad is None for p in opts[0].sparse_params())
    assert all(p.grad is not None for p in opts[1].sparse_params())
    # Adam divides by sqrt(v): float-rounding noise in a near-zero gradient can move an entry by a
    # small fraction of lr, and the runs then drift apart slowly; the tolerance is 0.5% of lr (1e-2).
    for a, b, a0 in zip(opts[0].sparse_params(), opts[1].sparse_params(), start, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=0)
        assert (a != a0).sum() > 0  # SO did update every matrix
    handle.remove()


def test_deepcopy_of_patched_model_is_a_dense_model() -> None:
    model = use_plain_attention(tiny_clip())
    params = trainable_matrices(model)
    so = make_so(params)
    enable_sparse_grads(model, so)
    twin = copy.deepcopy(model)
    images, text, labels = batch()
    clip_loss(twin, images, text, labels).backward()
    assert all(so.grad_probe(p).grad is None for p in params)  # the original's probes are untouched
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    assert len(twin_params) == 16 and all(p.grad is not None for p in twin_params)
    clip_loss(model, images, text, labels).backward()
    assert all(so.grad_probe(p).grad is not None and p.grad is None for p in params)
