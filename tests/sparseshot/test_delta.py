"""SparseDelta: exact save/load/apply/revert, encodings, integrity checks and base matching."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from sparseshot import delta as delta_mod
from sparseshot import delta_entries
from sparseshot.base import load_base
from sparseshot.delta import DeltaError, SparseDelta, weights_fingerprint

SPARSE_2D = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # (256, 64)
SPARSE_1D = "visual.ln_post.bias"  # (64,)
DENSE = "visual.proj"  # (64, 32): every entry changed -> dense encoding
IN_PROJ = "transformer.resblocks.1.attn.in_proj_weight"  # (192, 64)


def _bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.detach().contiguous().cpu().numpy().tobytes() for k, v in state.items()}


def _same_bits(model: nn.Module, reference: dict[str, bytes]) -> bool:
    return _bits(model.state_dict()) == reference


@pytest.fixture()
def base() -> nn.Module:
    return copy.deepcopy(load_base("sparseshot-tiny:random", device="cpu").model)


def _adapt(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy with a few entries of a 2-D and a 1-D tensor changed, and one tensor changed everywhere."""
    g = torch.Generator().manual_seed(seed)
    adapted = copy.deepcopy(model)
    state = dict(adapted.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, k in ((SPARSE_2D, 37), (SPARSE_1D, 5)):
            flat = state[name].view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[:k]
            flat[idx] += torch.randn(k, generator=g)
        state[DENSE] += torch.randn(state[DENSE].shape, generator=g)
    return adapted


def test_roundtrip_apply_revert_bit_exact(base: nn.Module, tmp_path: Path) -> None:
    adapted = _adapt(base)
    base_bits, adapted_bits = _bits(base.state_dict()), _bits(adapted.state_dict())
    meta = {"base_model": "sparseshot-tiny:random", "classes": ["a", "b"], "template": "a photo of a {}.",
            "method": "so", "hparams": {"lr": 2e-4}}
    delta = SparseDelta.from_models(base, adapted, meta=meta)
    delta.extras["class_embeddings"] = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    enc = {e.name: e for e in delta.entries}
    assert set(enc) == {SPARSE_2D, SPARSE_1D, DENSE}
    assert enc[SPARSE_2D].encoding == "sparse" and enc[SPARSE_2D].indices.dtype == torch.int32
    assert enc[SPARSE_1D].encoding == "sparse" and enc[SPARSE_1D].nnz == 5
    assert enc[DENSE].encoding == "dense"
    assert all(e.mode == "assign" for e in delta.entries)

    path = tmp_path / "model.delta"
    delta.save(path)
    loaded = SparseDelta.load(path)
    assert loaded.meta["base_fingerprint"] == weights_fingerprint(base)
    for key in ("classes", "template", "method", "hparams", "base_model", "library_version", "created_at"):
        assert loaded.meta[key] == delta.meta[key]
    assert torch.equal(loaded.class_embeddings, delta.class_embeddings)

    loaded.apply(base)
    assert _same_bits(base, adapted_bits)
    loaded.revert(base)
    assert _same_bits(base, base_bits)


def test_counts_and_sizes(base: nn.Module, tmp_path: Path) -> None:
    adapted = _adapt(base)
    delta = SparseDelta.from_models(base, adapted)
    numel = dict(base.state_dict())
    assert delta.nnz == 37 + 5 + numel[DENSE].numel()
    total = sum(numel[n].numel() for n in (SPARSE_2D, SPARSE_1D, DENSE))
    assert delta.density == pytest.approx(delta.nnz / total)
    path = tmp_path / "d.safetensors"
    delta.save(path)
    assert delta.nbytes == path.stat().st_size == SparseDelta.load(path).nbytes
    # Sparse entries cost (int32 index + fp32 value) per changed entry, plus a small header.
    assert delta.nbytes < (37 + 5) * 8 + numel[DENSE].numel() * 4 + 4096


def test_names_keep_unchanged_tensors_in_density(base: nn.Module) -> None:
    adapted = _adapt(base)
    names = [SPARSE_2D, "visual.transformer.resblocks.0.mlp.c_proj.weight"]  # second is unchanged
    delta = SparseDelta.from_models(base, adapted, names=names)
    assert delta.names == names and delta.nnz == 37
    assert delta.density == pytest.approx(37 / (2 * 256 * 64))


def test_int64_indices_beyond_int32_range(base: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delta_entries, "_INT32_LIMIT", 1000)  # pretend tensors of >= 1000 entries are huge
    delta = SparseDelta.from_models(base, _adapt(base))
    restored = SparseDelta.from_bytes(delta.to_bytes())
    dtypes = {e.name: e.indices.dtype for e in restored.entries if e.indices is not None}
    assert dtypes == {SPARSE_2D: torch.int64, SPARSE_1D: torch.int32}


def test_half_precision_values_are_additive_and_approximate(base: nn.Module, tmp_path: Path) -> None:
    adapted = _adapt(base)
    base_bits = _bits(base.state_dict())
    full = SparseDelta.from_models(base, adapted)
    half = SparseDelta.from_models(base, adapted, value_dtype=torch.float16)
    assert all(e.mode == "add" and e.values.dtype == torch.float16 for e in half.entries)
    assert half.nbytes < full.nbytes
    half.save(tmp_path / "h.delta")
    loaded = SparseDelta.load(tmp_path / "h.delta")
    loaded.apply(base)
    for name, ref in adapted.state_dict().items():
        torch.testing.assert_close(base.state_dict()[name], ref, atol=2e-3, rtol=0)
    loaded.revert(base)
    assert _same_bits(base, base_bits)


def test_lowrank_apply_revert(base: nn.Module, tmp_path: Path) -> None:
    base_bits = _bits(base.state_dict())
    w0 = base.state_dict()[IN_PROJ].clone()  # (192, 64)
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)
    adapted = _adapt(base)
    delta = SparseDelta.from_models(base, adapted)
    delta.add_lowrank(IN_PROJ, 64, B, A, 0.5, param_numel=w0.numel())  # the k rows
    delta.add_lowrank(IN_PROJ, 128, B, A, 0.25, param_numel=w0.numel())  # the v rows
    assert delta.nnz == 37 + 5 + 64 * 32 + 2 * 64 * 64
    delta.save(tmp_path / "lr.delta")
    loaded = SparseDelta.load(tmp_path / "lr.delta")
    loaded.apply(base)
    w = base.state_dict()[IN_PROJ]
    assert torch.equal(w[:64], w0[:64])
    torch.testing.assert_close(w[64:128], w0[64:128] + 0.5 * B @ A)
    torch.testing.assert_close(w[128:], w0[128:] + 0.25 * B @ A)
    assert torch.equal(base.state_dict()[SPARSE_2D], adapted.state_dict()[SPARSE_2D])
    loaded.revert(base)
    assert _same_bits(base, base_bits)


def test_lowrank_block_must_fit(base: nn.Module) -> None:
    delta = SparseDelta.empty()
    delta.add_lowrank(IN_PROJ, 160, torch.ones(64, 2), torch.ones(2, 64), 1.0)  # rows 160..224 > 192
    bits = _bits(base.state_dict())
    with pytest.raises(DeltaError, match="does not fit"):
        delta.apply(base, check=False)
    assert _same_bits(base, bits)


def test_mismatched_base_rejected(base: nn.Module) -> None:
    delta = SparseDelta.from_models(base, _adapt(base), meta={"base_model": "sparseshot-tiny:random"})
    other = _adapt(base, seed=7)  # different weights, same names and shapes
    with pytest.raises(DeltaError, match="fingerprint"):
        delta.check(other)
    bits = _bits(other.state_dict())
    with pytest.raises(DeltaError, match="base model mismatch"):
        delta.apply(other)
    assert _same_bits(other, bits)

    state = {k: v.clone() for k, v in base.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != SPARSE_1D}
    with pytest.raises(DeltaError, match=SPARSE_1D.replace(".", r"\.")):
        delta.check(missing)
    reshaped = dict(state, **{SPARSE_2D: state[SPARSE_2D].reshape(64, 256)})
    with pytest.raises(DeltaError, match="shape"):
        delta.check(reshaped)
    delta.check(state)  # the right base passes


def test_apply_is_all_or_nothing(base: nn.Module) -> None:
    delta = SparseDelta.from_models(base, _adapt(base))
    delta.entries[-1].shape = (3, 3)  # last entry no longer fits: first entries must not be written
    bits = _bits(base.state_dict())
    with pytest.raises(DeltaError):
        delta.apply(base, check=False)
    assert _same_bits(base, bits)


def test_failure_while_writing_rolls_back(base: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    delta = SparseDelta.from_models(base, _adapt(base))
    delta.add_lowrank(IN_PROJ, 0, torch.ones(64, 2), torch.ones(2, 64), 1.0)

    def fail(*args: object) -> None:
        raise RuntimeError("device error")

    monkeypatch.setattr(delta_mod, "_apply_lowrank", fail)  # sparse entries are written first
    bits = _bits(base.state_dict())
    with pytest.raises(RuntimeError, match="device error"):
        delta.apply(base, check=False)
    assert _same_bits(base, bits)
    assert not delta_mod.is_applied(base)


def test_double_apply_and_stray_revert_rejected(base: nn.Module) -> None:
    delta = SparseDelta.from_models(base, _adapt(base))
    with pytest.raises(DeltaError, match="not applied"):
        delta.revert(base)
    delta.apply(base)
    with pytest.raises(DeltaError, match="already applied"):
        delta.apply(base, check=False)
    with pytest.raises(DeltaError, match="already applied"):
        SparseDelta.empty().apply(base, check=False)
    delta.revert(base)
    delta.apply(base)  # applicable again after revert
    delta.revert(base)


def test_truncated_and_tampered_files_rejected(base: nn.Module, tmp_path: Path) -> None:
    delta = SparseDelta.from_models(base, _adapt(base), meta={"classes": ["x"]})
    data = delta.to_bytes()
    bits = _bits(base.state_dict())
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "truncated": data[: len(data) // 2],
        "truncated_header": data[:20],
        "tampered_value": data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:],
        "tampered_meta": data.replace(b'\\"classes\\": [\\"x\\"]', b'\\"classes\\": [\\"y\\"]'),
        "garbage": os.urandom(256),
    }
    assert cases["tampered_meta"] != data and len(data) > header_len + 8
    for label, blob in cases.items():
        path = tmp_path / f"{label}.delta"
        path.write_bytes(blob)
        with pytest.raises(DeltaError) as info:
            SparseDelta.load(path).apply(base)
        assert str(path) in str(info.value), label
    assert _same_bits(base, bits)
    with pytest.raises(DeltaError, match="checksum"):
        SparseDelta.from_bytes(cases["tampered_value"])


def test_wrong_format_and_missing_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(DeltaError, match="not a sparseshot delta"):
        SparseDelta.load(plain)
    with pytest.raises(DeltaError, match="cannot read"):
        SparseDelta.load(tmp_path / "absent.delta")


def test_atomic_save_leaves_no_temp_files(base: nn.Module, tmp_path: Path) -> None:
    delta = SparseDelta.from_models(base, _adapt(base))
    target = tmp_path / "m.delta"
    target.write_bytes(b"old")
    delta.save(target)  # replaces an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.delta"]
    assert SparseDelta.load(target).nnz == delta.nnz

    bad = SparseDelta.empty(meta={"not_json": object()})
    with pytest.raises(DeltaError, match="JSON"):
        bad.save(tmp_path / "bad.delta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.delta"]


def test_fingerprint_stable_and_sensitive(base: nn.Module) -> None:
    fp = weights_fingerprint(base)
    assert fp == weights_fingerprint({k: v.clone() for k, v in base.state_dict().items()})
    assert len(fp) == 64
    with torch.no_grad():
        p = base.state_dict(keep_vars=True)[SPARSE_1D]
        p[0] = torch.nextafter(p[0], torch.tensor(1.0))  # one ulp
    assert weights_fingerprint(base) != fp


def test_to_bytes_is_a_pure_function_of_the_delta(base: nn.Module) -> None:
    # safetensors writes its metadata map in hash order; the delta file must not depend on it
    # (content-addressed storage and "exact duplicate" import checks key on these bytes).
    delta = SparseDelta.from_models(base, _adapt(base), meta={"classes": ["x", "y"], "template": "{}"})
    delta.extras["class_embeddings"] = torch.ones(2, 4)
    first = delta.to_bytes()
    assert all(delta.to_bytes() == first for _ in range(8))
    again = SparseDelta.from_bytes(first)
    assert again.to_bytes() == first  # a loaded delta writes back the identical file
    header = first[8 : 8 + int.from_bytes(first[:8], "little")]
    canonical = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    assert header == canonical.ljust(len(header))  # sorted keys, padded with spaces


def test_delta_does_not_alias_the_adapted_model(base: nn.Module) -> None:
    # Training may go on after a delta was taken (the budget branches of one run): every encoding,
    # the dense one (the live fp32 tensor on CPU) included, holds its own copy of the values.
    adapted = _adapt(base)
    delta = SparseDelta.from_models(base, adapted)
    assert {e.encoding for e in delta.entries if e.name in (DENSE, SPARSE_2D)} == {"dense", "sparse"}
    before = delta.to_bytes()
    with torch.no_grad():
        for p in adapted.parameters():
            p.add_(1.0)
    assert delta.to_bytes() == before
