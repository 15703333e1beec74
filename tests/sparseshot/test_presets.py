"""Presets: every one validates through the recipe, params override them, estimates use the table."""

from __future__ import annotations

from typing import get_args

import pytest

from sparseshot import presets
from sparseshot.recipe import hparam_defaults, planned_steps, validate_hparams


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
@pytest.mark.parametrize("method", ["so", "lora"])
def test_every_preset_validates(name: str, method: str) -> None:
    hp = presets.preset_params(name, method)
    assert hp == validate_hparams(method, presets.PRESETS[name][method])


def test_standard_is_the_recipe_and_quick_is_shorter() -> None:
    for method in ("so", "lora"):
        assert presets.preset_params("standard", method) == validate_hparams(method, {})
        quick = presets.preset_params("quick", method)["n_iters"]
        thorough = presets.preset_params("thorough", method)["n_iters"]
        assert quick < hparam_defaults(method)["n_iters"] < thorough


def test_params_override_the_preset_and_bad_input_is_refused() -> None:
    hp = presets.preset_params("quick", "so", {"lr": 5e-3, "density": 1e-3})
    assert hp["lr"] == 5e-3 and hp["density"] == 1e-3
    assert hp["n_iters"] == presets.PRESETS["quick"]["so"]["n_iters"]
    with pytest.raises(ValueError, match="preset"):
        presets.preset_params("fast", "so")
    with pytest.raises(ValueError, match="bogus"):
        presets.preset_params("quick", "so", {"bogus": 1})
    with pytest.raises(ValueError, match="preset"):
        presets.preset_params("quick", "dense")
    assert presets.preset_params("quick", "zeroshot") == validate_hparams("zeroshot", {})


def test_api_schema_lists_the_same_presets() -> None:
    from app.schemas import PresetName

    assert set(get_args(PresetName)) == set(presets.PRESETS)


def test_estimate_is_steps_times_measured_step_time() -> None:
    per_step = presets.step_seconds("sparseshot-tiny:random", "so", "cpu")
    assert per_step is not None and per_step > 0
    _, steps, batch = planned_steps(presets.preset_params("quick", "so"), 40, 10)
    assert (steps, batch) == (4 * presets.PRESETS["quick"]["so"]["n_iters"], 32)
    est = presets.estimate_seconds("sparseshot-tiny:random", "so", "cpu", steps=steps, batch=batch)
    assert est == pytest.approx(steps * per_step, rel=1e-3)
    half = presets.estimate_seconds("sparseshot-tiny:random", "so", "cpu", steps=steps, batch=16)
    assert half == pytest.approx(est / 2, rel=1e-2)
    # An unmeasured architecture falls back to the default base's figure; an unmeasured device: None.
    default = presets.step_seconds("ViT-B-16:openai", "so", "cpu")
    assert default is not None and presets.step_seconds("/ckpt/mine.pt", "so", "cpu") == default
    assert presets.estimate_seconds("sparseshot-tiny:random", "so", "mps", steps=10, batch=32) is None
