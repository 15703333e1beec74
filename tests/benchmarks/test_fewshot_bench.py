"""benchmarks.fewshot: the offline quick mode and the real-data mode on a fake miniature data tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import datasets as ds
from benchmarks import fewshot

TINY = "sparseshot-tiny:random"
FAST = ["--seeds", "1", "--so-iters", "1", "--lora-iters", "1", "--device", "cpu", "--quiet"]


def _check_table(table: dict, tasks: list[str], methods: list[str], shots: list[str],
                 budget_rows: tuple[str, ...] = ()) -> None:
    assert set(table["average"]) == set(methods) | set(budget_rows)
    for m in methods:
        assert set(table["average"][m]) == set(shots)
        assert all(0.0 <= v <= 100.0 for v in table["average"][m].values())
    assert set(table["tasks"]) == set(tasks)
    for t in tasks:
        for m in methods:
            for k in shots:
                cell = table["tasks"][t][m][k]
                assert set(cell) == {"mean", "std"} and cell["std"] >= 0
    assert set(table["train_seconds"]) == set(methods) | set(budget_rows)


def _image(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def _fake_tree(root) -> None:
    """eurosat (split_zhou JSON) and fgvc_aircraft (variant lists), 2 classes, 3 train / 2 test each."""
    colours = [(200, 30, 30), (30, 30, 200)]
    euro = root / "eurosat"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for y, name in enumerate(["Annual Crop Land", "Forest"]):
        for part, n in (("train", 3), ("test", 2)):
            for i in range(n):
                rel = f"{name.replace(' ', '')}/{part}_{i}.jpg"
                _image(euro / "2750" / rel, colours[y])
                split[part].append([rel, y, name])
    (euro / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    data = root / "fgvc_aircraft" / "data"
    variants = ["707-320", "A380"]
    (data).mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, n in (("train", 3), ("test", 2)):
        lines = []
        for y, v in enumerate(variants):
            for i in range(n):
                img = f"{part}{y}{i:04d}"
                _image(data / "images" / f"{img}.jpg", colours[y])
                lines.append(f"{img} {v}")
        (data / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")


def test_real_data_loaders_read_the_layout(tmp_path):
    _fake_tree(tmp_path)
    tasks = {t.name: t for t in ds.load_real_tasks(tmp_path)}
    assert set(tasks) == {"eurosat", "fgvc_aircraft"}
    euro = tasks["eurosat"]
    assert euro.classes == ["Annual Crop Land", "Forest"]
    assert euro.template == "a centered satellite photo of {}."
    assert len(euro.train_images) == 6 and len(euro.test_labels) == 4
    assert euro.test_images[0].mode == "RGB"
    air = tasks["fgvc_aircraft"]
    assert air.classes == ["707-320", "A380"] and air.train_labels.count(1) == 3
    imgs, labels = air.sample(2, seed=1)
    assert sorted(labels) == [0, 0, 1, 1] and all(im.size == (12, 10) for im in imgs)
    assert air.sample(2, seed=1)[1] == labels  # same seed, same draw
    with pytest.raises(ValueError, match="unknown datasets"):
        ds.load_real_tasks(tmp_path, ["mnist"])
    with pytest.raises(ValueError, match="no dataset folders"):
        ds.load_real_tasks(tmp_path / "empty")


def test_real_data_mode_end_to_end(tmp_path, capsys):
    _fake_tree(tmp_path / "data")
    out = tmp_path / "table.json"
    rc = fewshot.main(["--data-root", str(tmp_path / "data"), "--base", TINY, "--shots", "1,2",
                       "--json", str(out), *FAST])
    assert rc == 0
    table = json.loads(out.read_text())
    methods = ["zeroshot", "so", "so-code", "lora"]
    _check_table(table, ["eurosat", "fgvc_aircraft"], methods, ["1", "2"])
    assert table["published_4shot_average"] == {"so": 78.9, "lora": 75.4, "zeroshot": 65.1}
    assert table["config"]["mode"] == "real" and table["config"]["crop_scale"] is None
    assert table["config"]["methods"]["so-code"]["density"] == 5e-5  # the nominal densities
    printed = capsys.readouterr().out
    assert "published 4-shot avg" in printed and "78.9" in printed


def test_offline_quick_mode_json_shape(tmp_path):
    out = tmp_path / "quick.json"
    rc = fewshot.main(["--offline", "--quick", "--base", TINY, "--so-variants", "paper",
                       "--json", str(out), *FAST])
    assert rc == 0
    table = json.loads(out.read_text())
    _check_table(table, ["shifted_shapes", "digits"], ["zeroshot", "so", "lora"], ["1", "4"],
                 budget_rows=("so@0.05", "so@0.01"))
    cfg = table["config"]
    assert cfg["mode"] == "quick" and cfg["methods"]["so"]["density"] == pytest.approx(5e-4 * 36)
    assert cfg["methods"]["lora"]["n_iters"] == 1
    assert cfg["methods"]["so"]["delta_budget"] == 1.0  # the "so" row is unbudgeted
    # The quick budget curve: rows so@0.05 and so@0.01 at 4 shots only, each delta within its budget.
    for label, budget in (("so@0.05", 0.05), ("so@0.01", 0.01)):
        assert set(table["average"][label]) == {"4"}
        assert 0 < table["delta"][label]["4"]["density"] <= budget
        assert "1" not in table["tasks"]["digits"][label]
    # Stored-delta columns for every method and shot count.
    for m in ["zeroshot", "so", "lora"]:
        for k in ["1", "4"]:
            d = table["delta"][m][k]
            assert d["bytes"] > 0 and 0.0 <= d["density"] <= 1.0 and d["nnz"] >= 0
    assert table["delta"]["zeroshot"]["4"]["nnz"] == 0 and table["delta"]["so"]["4"]["nnz"] > 0
    assert table["delta"]["so"]["4"]["bytes"] > table["delta"]["zeroshot"]["4"]["bytes"]
    curve = table["budget_curve"]["so"]
    assert set(curve["budgets"]) == {"1", "0.05", "0.01"} and curve["shots"] == "4"
    assert curve["budgets"]["1"]["4"]["average"] == table["average"]["so"]["4"]
    assert curve["default"] in (1.0, 0.05, 0.01)
    ok = [float(b) for b, row in curve["budgets"].items()
          if row["4"]["average"] >= curve["budgets"]["1"]["4"]["average"] - 1.0]
    assert curve["default"] == min(ok)


def test_synthetic_world_is_deterministic():
    a_img, a_txt = ds.pretraining_batch(4, 32, seed=7)
    b_img, b_txt = ds.pretraining_batch(4, 32, seed=7)
    assert a_txt == b_txt and np.array_equal(a_img, b_img)
    assert all(t.startswith("a photo of a ") and t.endswith(".") for t in a_txt)
    task = ds.shifted_shapes_task(32, n_train_per_class=1, n_test_per_class=1)
    assert len(task.classes) == len(ds.SHAPES) * len(ds.COLOURS) == len(task.test_images)
    digits = ds.digits_task(32, n_test_per_class=2)
    assert digits.classes[0] == "zero" and len(digits.test_images) == 20
    assert digits.test_images[0].size == (32, 32)


def test_streamed_and_preloaded_test_splits_agree(tmp_path, monkeypatch):
    import sparseshot

    _fake_tree(tmp_path)
    task = ds.load_real_task(tmp_path, "eurosat")
    base = sparseshot.load_base(TINY, device="cpu")
    r = sparseshot.adapt(base, [], [], task.classes, method="zeroshot")
    preloaded = fewshot.EvalSplit(base, task, batch=3)
    assert preloaded.tensor is not None
    want = fewshot.accuracy(base, r, preloaded, {})
    monkeypatch.setattr(fewshot, "PRELOAD_MAX_IMAGES", 0)
    streamed = fewshot.EvalSplit(base, task, batch=3)
    assert streamed.tensor is None
    assert fewshot.accuracy(base, r, streamed, {}) == want
