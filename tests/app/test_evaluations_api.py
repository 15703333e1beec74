"""Evaluations and classify thresholds through the API, on SQLite and PostgreSQL.

The inference stand-in scores an image by its colour: class i gets channel i of the pixel over the
sum of the channels, so every figure below can be checked by hand.
"""

from __future__ import annotations

import json

import pytest

import app.services.inference as inference
from app.core.config import Settings
from sparseshot.delta import SparseDelta
from tests.app.test_models_api import (
    _classify,
    _zeroshot,
    fake_inference,  # noqa: F401 - fixture
)

CLASSES = ("cat", "dog", "bird")
# (label, colour): the stand-in's top-1 in the comment
IMAGES = [
    ("cat", (200, 55, 0)),  # cat
    ("cat", (60, 195, 0)),  # dog
    ("dog", (0, 255, 0)),  # dog
    ("dog", (0, 205, 50)),  # dog
    ("bird", (30, 0, 225)),  # bird
    ("bird", (150, 0, 105)),  # cat
    ("fish", (10, 10, 10)),  # not a class of the model: excluded
]


@pytest.fixture
def colour_inference(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Zero-shot deltas as small files; classify scores by colour. Returns the batch sizes seen."""
    batches: list[int] = []

    class SmallDelta(SparseDelta):
        def to_bytes(self) -> bytes:
            return json.dumps(self.meta, sort_keys=True).encode()

    def zeroshot_delta(*, bases, classes, base_model, template):
        return SmallDelta({"classes": classes, "base": base_model, "template": template})

    def classify(*, model, images, top_k, storage, serving):
        batches.append(len(images))
        out = []
        for name, im in images:
            px = im.getpixel((0, 0))
            scores = [px[i] / sum(px) for i in range(len(model.classes))]
            ranked = sorted(zip(model.classes, scores, strict=True), key=lambda cs: -cs[1])[:top_k]
            out.append({"filename": name, "labels": [{"label": c, "score": s} for c, s in ranked]})
        return out

    monkeypatch.setattr(inference, "zeroshot_delta", zeroshot_delta)
    monkeypatch.setattr(inference, "classify", classify)
    return batches


def _labelled_dataset(api, images=IMAGES) -> dict:
    ds = api.dataset(tuple(dict.fromkeys([*CLASSES, *(label for label, _ in images)])))
    for label, colour in images:
        assert api.upload(ds["id"], label, api.image(colour)).status_code == 201
    return ds


def _evaluate(api, model_id: str, dataset_id: str):
    return api.client.post(f"/v1/models/{model_id}/evaluations", json={"dataset_id": dataset_id},
                           headers=api.headers)


def test_evaluation_figures_stored_and_listed(api, colour_inference, settings: Settings) -> None:
    model = _zeroshot(api, CLASSES)
    ds = _labelled_dataset(api)
    r = _evaluate(api, model["id"], ds["id"])
    assert r.status_code == 201, r.text
    ev = r.json()
    assert ev["model_id"] == model["id"] and ev["dataset_id"] == ds["id"]
    assert ev["classes"] == list(CLASSES) and ev["n_images"] == 6
    assert ev["excluded_images"] == 1 and ev["excluded_labels"] == {"fish": 1}
    assert ev["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert ev["accuracy"] == pytest.approx(4 / 6)
    pc = ev["per_class"]
    assert pc["cat"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert pc["dog"]["precision"] == pytest.approx(2 / 3) and pc["dog"]["recall"] == 1.0
    assert pc["dog"]["f1"] == pytest.approx(0.8) and pc["dog"]["support"] == 2
    assert (pc["bird"]["precision"], pc["bird"]["recall"]) == (1.0, 0.5)
    # cat's probabilities: its images 200/255 and 60/255, the bird at 150/255 between them:
    # accepting down to 60/255 gives P=2/3, R=1 (F1 0.8) against 200/255's P=1, R=1/2.
    th = ev["suggested_thresholds"]
    assert th["cat"] == pytest.approx(60 / 255)
    assert th["dog"] == pytest.approx(205 / 255) and th["bird"] == pytest.approx(105 / 255)
    assert colour_inference == [4, 2]  # max_files_per_request (4) images per serving call

    listed = api.client.get(f"/v1/models/{model['id']}/evaluations", headers=api.headers).json()
    assert listed == [ev]
    one = api.client.get(f"/v1/models/{model['id']}/evaluations/{ev['id']}", headers=api.headers)
    assert one.status_code == 200 and one.json() == ev

    # The dataset can go; the evaluation keeps its figures. The model's deletion takes it along.
    assert api.client.delete(f"/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204
    kept = api.client.get(f"/v1/models/{model['id']}/evaluations/{ev['id']}", headers=api.headers).json()
    assert kept["dataset_id"] is None and kept["confusion_matrix"] == ev["confusion_matrix"]
    assert api.client.delete(f"/v1/models/{model['id']}", headers=api.headers).status_code == 204
    api.problem(api.client.get(f"/v1/models/{model['id']}/evaluations", headers=api.headers), 404)


def test_evaluation_refusals(api, colour_inference, make_key, settings: Settings) -> None:
    model = _zeroshot(api, CLASSES)
    other = type(api)(api.client, make_key("other"))
    theirs = _labelled_dataset(other, IMAGES[:2])
    api.problem(_evaluate(api, model["id"], theirs["id"]), 404)  # another tenant's dataset
    api.problem(_evaluate(other, model["id"], theirs["id"]), 404)  # another tenant's model
    api.problem(_evaluate(api, model["id"], "no-such-dataset"), 404)
    only_fish = _labelled_dataset(api, [("fish", (1, 2, 3))])
    assert "no image labelled" in api.problem(_evaluate(api, model["id"], only_fish["id"]), 422)["detail"]
    r = api.client.post(f"/v1/models/{model['id']}/evaluations", json={"dataset_id": only_fish["id"], "x": 1},
                        headers=api.headers)
    api.problem(r, 422)
    settings.max_evaluation_images = 5
    ds = _labelled_dataset(api)  # 6 evaluable images
    assert "over the limit of 5" in api.problem(_evaluate(api, model["id"], ds["id"]), 413)["detail"]
    assert colour_inference == []  # refused before any image was classified
    api.problem(api.client.get(f"/v1/models/{model['id']}/evaluations/nope", headers=api.headers), 404)


def test_classify_threshold(api, fake_inference) -> None:  # noqa: F811 - scores 0.6, 0.3, 0.1
    model = _zeroshot(api, CLASSES)
    img = api.image()

    def labels(threshold: str | None, top_k: int = 3) -> list:
        files = [("files", ("q.png", img, "image/png"))]
        data = {"top_k": str(top_k), **({"threshold": threshold} if threshold is not None else {})}
        r = api.client.post(f"/v1/models/{model['id']}/classify", files=files, data=data, headers=api.headers)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["unknown"] == (not pred["labels"])
        return [ls["label"] for ls in pred["labels"]]

    assert labels(None) == ["cat", "dog", "bird"]
    assert labels("0.3") == ["cat", "dog"]  # at the threshold is kept
    assert labels("0.5") == ["cat"]
    assert labels("0.7") == []  # unknown
    assert labels('{"cat": 0.7}') == ["dog", "bird"]  # classes left out are not cut
    assert labels('{"cat": 0.7, "dog": null, "bird": 0.2}') == ["dog"]
    assert labels("0.5", top_k=1) == ["cat"] and labels('{"cat": 0.7}', top_k=1) == []  # cut within the top-k
    assert _classify(api, model["id"], img).json()["predictions"][0]["unknown"] is False
    for bad in ("1.5", "-0.1", "abc", "true", "NaN", '{"fish": 0.1}', '{"cat": 2}', "[0.5]"):
        files = [("files", ("q.png", img, "image/png"))]
        r = api.client.post(f"/v1/models/{model['id']}/classify", files=files, data={"threshold": bad},
                            headers=api.headers)
        assert "threshold" in api.problem(r, 422)["detail"], bad


def test_evaluation_through_the_real_serving_path_agrees_with_classify(api) -> None:
    """The tiny random base: whatever it predicts, the evaluation counts what /classify answers."""
    model = _zeroshot(api, CLASSES)
    ds = _labelled_dataset(api)
    ev = _evaluate(api, model["id"], ds["id"]).json()
    truth, top1 = [], []
    for label, colour in IMAGES[:6]:
        r = _classify(api, model["id"], api.image(colour), top_k=1)
        truth.append(CLASSES.index(label))
        top1.append(CLASSES.index(r.json()["predictions"][0]["labels"][0]["label"]))
    want = [[sum(1 for t, p in zip(truth, top1, strict=True) if (t, p) == (i, j)) for j in range(3)]
            for i in range(3)]
    assert ev["confusion_matrix"] == want
    assert ev["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, top1, strict=True)) / 6)
    for c in CLASSES:  # a threshold is one of the class's own images' probabilities
        assert ev["suggested_thresholds"][c] is not None and 0.0 < ev["suggested_thresholds"][c] <= 1.0
