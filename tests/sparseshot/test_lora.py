"""sparseshot.lora: adapters on q/k/v, block selection, merged low-rank parts, removal."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import sparseshot
from sparseshot.lora import LoRAAdapter, add_lora, lora_delta_parts, remove_lora, select_blocks


@pytest.fixture(scope="module")
def base():
    return sparseshot.load_base("sparseshot-tiny:random", device="cpu")


def _outputs(model, base):
    torch.manual_seed(0)
    x = torch.randn(2, 3, base.image_size, base.image_size)
    tokens = base.tokenizer(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tokens)


def _randomise_B(params):
    with torch.no_grad():
        for p in params:
            if p.shape[1] == 2:  # B (d_out, r)
                p.normal_(0, 0.5)


def test_adapter_scale_and_zero_init():
    a = LoRAAdapter(8, 6, rank=4, alpha=2.0, dropout=0.0)
    assert a.scale == pytest.approx(2.0 / math.sqrt(4))  # alpha / sqrt(r)
    assert a.A.shape == (4, 8) and a.B.shape == (6, 4)
    assert torch.count_nonzero(a(torch.randn(3, 8))) == 0  # B = 0: no change at start


def test_add_lora_starts_equal_and_trains_only_adapters(base):
    model = copy.deepcopy(base.model)
    ref = _outputs(model, base)
    params = add_lora(model, rank=2, alpha=1.0, dropout=0.25)
    assert len(params) == 2 * 3 * 4  # (A, B) x (q, k, v) x 2 blocks x 2 towers
    assert all(p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model.eval()
    for got, want in zip(_outputs(model, base), ref, strict=True):
        torch.testing.assert_close(got, want)


def test_select_blocks_encoder_and_positions(base):
    names = [n for n, _ in select_blocks(base.model, "vision", [-1])]
    assert names == ["visual.transformer.resblocks.1"]
    names = [n for n, _ in select_blocks(base.model, "text", "all")]
    assert names == ["transformer.resblocks.0", "transformer.resblocks.1"]
    assert len(select_blocks(base.model, "both", [0])) == 2
    with pytest.raises(ValueError, match="out of range"):
        select_blocks(base.model, "both", [5])
    with pytest.raises(ValueError, match="encoder"):
        select_blocks(base.model, "audio")


def test_delta_parts_reproduce_the_adapted_model(base):
    model = copy.deepcopy(base.model)
    params = add_lora(model, encoder="both", dropout=0.25)
    _randomise_B(params)
    model.eval()  # dropout off
    adapted = _outputs(model, base)
    parts = lora_delta_parts(model)
    assert len(parts) == 3 * 4
    e = 64
    assert sorted({p[1] for p in parts}) == [0, e, 2 * e]
    delta = sparseshot.SparseDelta.empty({"base_fingerprint": base.fingerprint})
    for name, row_start, B, A, scale in parts:
        delta.add_lowrank(name, row_start, B, A, scale)
    merged = copy.deepcopy(base.model)
    delta.apply(merged)
    for got, want in zip(_outputs(merged, base), adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_remove_lora_restores_base_behaviour(base):
    model = copy.deepcopy(base.model)
    ref = _outputs(model, base)
    _randomise_B(add_lora(model, encoder="vision", positions=[0]))
    model.eval()
    assert not torch.allclose(_outputs(model, base)[0], ref[0])
    remove_lora(model)
    assert lora_delta_parts(model) == []
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for got, want in zip(_outputs(model, base), ref, strict=True):
        torch.testing.assert_close(got, want)
