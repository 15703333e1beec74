"""Classifier: top-k probabilities from the vision tower, with a delta applied only during the forward."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sparseshot.base import BaseModel, load_base
from sparseshot.classifier import Classifier, class_text_embeddings
from sparseshot.delta import DeltaError, SparseDelta, weights_fingerprint

CLASSES = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture()
def base() -> BaseModel:
    return load_base("sparseshot-tiny:random", device="cpu")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    arrays = (torch.rand(n, 40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


def _adapted_delta(base: BaseModel, seed: int = 1) -> tuple[SparseDelta, torch.nn.Module]:
    """A delta that changes the vision tower's output projection and a few MLP entries."""
    g = torch.Generator().manual_seed(seed)
    adapted = copy.deepcopy(base.model)
    state = adapted.state_dict(keep_vars=True)
    with torch.no_grad():
        state["visual.proj"] += 0.5 * torch.randn(state["visual.proj"].shape, generator=g)
        fc = state["visual.transformer.resblocks.1.mlp.c_fc.weight"].view(-1)
        fc[torch.randperm(fc.numel(), generator=g)[:50]] += 1.0
    meta = {"base_model": base.spec, "base_fingerprint": base.fingerprint, "classes": CLASSES,
            "template": "a photo of a {}.", "method": "so"}
    delta = SparseDelta.from_models(base.model, adapted, meta=meta)
    delta.extras["class_embeddings"] = class_text_embeddings(adapted, base.tokenizer, CLASSES)
    return delta, adapted


def test_zero_shot_predictions(base: BaseModel) -> None:
    clf = Classifier(base, classes=CLASSES)
    images = _images(7)
    preds = clf.predict(images, top_k=3)
    assert len(preds) == 7
    for row in preds:
        assert len(row) == 3
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-6 and all(0.0 <= p <= 1.0 for p in probs)
        assert {c for c, _ in row} <= set(CLASSES) and len({c for c, _ in row}) == 3
    assert clf.predict(images, top_k=3) == preds  # deterministic
    full = clf.predict(images[:2], top_k=50)  # top_k larger than the class count
    assert [len(r) for r in full] == [5, 5]
    assert sum(p for _, p in full[0]) == pytest.approx(1.0, abs=1e-5)
    assert clf.predict([], top_k=3) == []
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(images, top_k=0)


def test_batching_does_not_change_results(base: BaseModel) -> None:
    images = _images(5)
    small = Classifier(base, classes=CLASSES, batch_size=2).probabilities(images)
    large = Classifier(base, classes=CLASSES, batch_size=64).probabilities(images)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-5)


def test_delta_changes_outputs_and_base_is_restored(base: BaseModel) -> None:
    delta, adapted = _adapted_delta(base)
    before = weights_fingerprint(base.model)
    images = _images(6)
    with_delta = Classifier(base, delta)
    assert with_delta.classes == CLASSES
    probs = with_delta.probabilities(images)

    # Same numbers as running the adapted model directly.
    pixels = torch.stack([base.preprocess_eval(im) for im in images])
    with torch.no_grad():
        feats = F.normalize(adapted.encode_image(pixels), dim=-1)
    ref = (adapted.logit_scale.exp() * feats @ delta.class_embeddings.T).softmax(-1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)

    plain = Classifier(base, class_embeddings=delta.class_embeddings, classes=CLASSES).probabilities(images)
    assert not torch.allclose(plain, probs, atol=1e-3)
    assert weights_fingerprint(base.model) == before == base.fingerprint
    assert with_delta.nbytes >= delta.class_embeddings.numel() * 4 + delta.nbytes


def test_embeddings_from_text_tower_with_delta(base: BaseModel) -> None:
    delta, adapted = _adapted_delta(base)
    expected = delta.extras.pop("class_embeddings")
    clf = Classifier(base, delta)  # no stored embeddings: computed with the delta applied
    torch.testing.assert_close(clf.class_embeddings, expected)
    assert weights_fingerprint(base.model) == base.fingerprint


def test_mismatched_delta_rejected(base: BaseModel) -> None:
    delta, _ = _adapted_delta(base)
    delta.meta["base_fingerprint"] = "0" * 64
    with pytest.raises(DeltaError, match="fingerprint"):
        Classifier(base, delta)
    with pytest.raises(ValueError, match="class"):
        Classifier(base, class_embeddings=torch.randn(3, 32), classes=CLASSES)


def test_concurrent_classifiers_share_the_base(base: BaseModel) -> None:
    images = _images(4)
    clfs = [Classifier(base, _adapted_delta(base, seed)[0]) for seed in (1, 2, 3)]
    expected = [c.probabilities(images) for c in clfs]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}

    def work(i: int) -> None:
        for _ in range(3):
            results[i].append(clfs[i].probabilities(images))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        for got in results[i]:
            torch.testing.assert_close(got, expected[i])
    assert weights_fingerprint(base.model) == base.fingerprint


def test_text_embeddings_helper(base: BaseModel) -> None:
    emb = Classifier.encode_texts(base, CLASSES, "a photo of a {}.")
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(emb, class_text_embeddings(base.model, base.tokenizer, CLASSES))
    other = class_text_embeddings(base.model, base.tokenizer, CLASSES, "a drawing of a {}", batch_size=2)
    assert not torch.allclose(emb, other)
    with pytest.raises(ValueError, match="template"):
        class_text_embeddings(base.model, base.tokenizer, CLASSES, "no placeholder")
