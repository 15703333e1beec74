"""sparseshot.configs (typed recipe configs) and sparseshot.prompts (templates, names, embeddings)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sparseshot
from sparseshot import configs, prompts
from sparseshot.base import tower_depths
from sparseshot.configs import LoRAConfig, SOConfig, ZeroShotConfig, config_for, validate_hparams


@pytest.fixture(scope="module")
def base():
    return sparseshot.load_base("sparseshot-tiny:random", device="cpu")


# ---- configs ---------------------------------------------------------------------------------


def test_config_for_returns_typed_defaults():
    so = config_for("so")
    assert isinstance(so, SOConfig) and so.lr == 2e-4 and so.betas == (0.9, 0.999)
    assert so.density == 5e-4 and so.refresh_every == 10 and so.template == prompts.DEFAULT_TEMPLATE
    assert 0 < so.delta_budget <= 1 and 0 <= so.refine_fraction <= 1
    lora = config_for("lora", {"rank": 4})
    assert isinstance(lora, LoRAConfig) and lora.rank == 4 and lora.n_iters == 500
    assert isinstance(config_for("zeroshot"), ZeroShotConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        so.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("method", configs.METHODS)
def test_every_field_is_documented_once(method):
    docs = configs.describe(method)
    names = [d.name for d in docs]
    assert names == list(configs.hparam_defaults(method)) and len(set(names)) == len(names)
    for d in docs:
        assert d.doc and d.type and "\n" not in d.doc
    schema = configs.params_json_schema(method)
    assert schema["additionalProperties"] is False and list(schema["properties"]) == names
    for d in docs:
        prop = schema["properties"][d.name]
        assert prop["default"] == d.default and prop["description"] == d.doc


def test_ranges_appear_in_docs_and_schema():
    by_name = {d.name: d for d in configs.describe("so")}
    assert by_name["density"].range == "(0.0, 1.0]" and by_name["encoder"].range == "vision | text | both"
    lr = configs.params_json_schema("so")["properties"]["lr"]
    assert lr["exclusiveMinimum"] == 0.0 and lr["maximum"] == 10.0
    assert configs.params_json_schema("so")["properties"]["encoder"]["enum"] == ["vision", "text", "both"]


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("so", {"delta_budget": 0}, "delta_budget must be in"),
        ("so", {"delta_budget": 1.5}, "delta_budget must be in"),
        ("so", {"delta_budget": "small"}, "delta_budget must be a number"),
        ("so", {"refine_fraction": -0.1}, "refine_fraction"),
        ("lora", {"delta_budget": 0.1}, "unknown hyperparameter"),
        ("so", {"betas": [0.9, 1.0]}, r"betas\[1\]"),
        ("so", {"encoder": None}, "encoder must be one of"),
        ("so", {"positions": []}, "positions"),
        ("so", {"template": "a {} and a {}"}, "exactly one"),
        ("so", {"template": "a photo\nof a {}"}, "control character"),
        ("zeroshot", {"template": 3}, "template"),
        ("lora", {"rank": 1.0}, "rank must be an integer"),
    ],
)
def test_bad_values_are_refused(method, params, match):
    with pytest.raises(ValueError, match=match):
        validate_hparams(method, params)


def test_validate_hparams_is_json_able_and_idempotent():
    out = validate_hparams("so", {"positions": (0, -1), "betas": (0.8, 0.9)})
    assert out["positions"] == [0, -1] and out["betas"] == [0.8, 0.9]
    assert validate_hparams("so", out) == out  # a stored job's params validate to themselves


def test_positions_beyond_the_depth_are_refused(base):
    depths = tower_depths("sparseshot-tiny:random")
    assert depths == {"vision": 2, "text": 2}
    assert tower_depths("ViT-B-16:openai") == {"vision": 12, "text": 12}
    assert tower_depths("no-such-model:random") is None
    with pytest.raises(ValueError, match="out of range for the vision tower"):
        validate_hparams("so", {"positions": [99]}, depths=depths)
    with pytest.raises(ValueError, match="out of range for the text tower"):
        validate_hparams("lora", {"positions": [2], "encoder": "text"}, depths=depths)
    assert validate_hparams("so", {"positions": [-2, 1]}, depths=depths)["positions"] == [-2, 1]
    config = config_for("so", {"positions": [99]})  # depth unknown: accepted here ...
    with pytest.raises(ValueError, match="out of range"):
        config.check_against(base)  # ... and refused against the loaded base
    with pytest.raises(ValueError, match="out of range"):
        sparseshot.adapt(base, [], [], ["a", "b"], "so", positions=[99])  # before any training


# ---- prompts ---------------------------------------------------------------------------------


def test_one_formatting_rule_keeps_other_braces_literal():
    assert prompts.format_prompts(["cat"], "a photo of a {}.") == ["a photo of a cat."]
    # str.format would give "a {x} cat" here; the one rule is: replace the single "{}", nothing else.
    assert prompts.format_prompts(["cat"], "a {{x}} {}") == ["a {{x}} cat"]
    assert prompts.format_prompts(["cat"], "{{}}") == ["{cat}"]
    assert prompts.format_prompts(["{}"], "a {}") == ["a {}"]  # a name is inserted, never re-scanned
    with pytest.raises(ValueError, match="exactly one"):
        prompts.format_prompts(["cat"], "no placeholder")


@pytest.mark.parametrize("name", ["", "   ", "tab\there", "new\nline", "nul\x00", "sep\u2028x", 5])
def test_check_class_name_refuses(name):
    with pytest.raises(ValueError):
        prompts.check_class_name(name)


def test_check_class_name_accepts_ordinary_names(base):
    for name in ["red circle", "Ünïcödé", "707-320", "猫", "a" * prompts.MAX_CLASS_NAME_CHARS]:
        assert prompts.check_class_name(name) == name
    with pytest.raises(ValueError, match="over the limit"):
        prompts.check_class_name("a" * (prompts.MAX_CLASS_NAME_CHARS + 1))
    with pytest.raises(ValueError, match="control character"):
        sparseshot.adapt(base, [], [], ["ok", "bad\x07"], "zeroshot")


def test_recipe_and_classifier_share_the_embeddings(base):
    from sparseshot.classifier import Classifier

    classes = ["red", "blue", "green"]
    r = sparseshot.adapt(base, [], [], classes, "zeroshot", template="a {{x}} {}")
    want = prompts.class_text_embeddings(base.model, base.tokenizer, classes, "a {{x}} {}")
    torch.testing.assert_close(r.class_embeddings, want, rtol=0, atol=0)
    torch.testing.assert_close(Classifier.encode_texts(base, classes, "a {{x}} {}"), want, rtol=0, atol=0)
    chunked = prompts.class_text_embeddings(base.model, base.tokenizer, classes, batch_size=2)
    torch.testing.assert_close(chunked, prompts.class_text_embeddings(base.model, base.tokenizer, classes))


@pytest.mark.parametrize("name", ["a\u2028b", "x\u2029", "\x85tab", "ok\x00"])
def test_the_api_pattern_refuses_what_the_recipe_refuses(name):
    import re

    from sparseshot import text_rules

    with pytest.raises(ValueError):
        text_rules.check_class_name(name)
    assert re.match(text_rules.NAME_PATTERN, name) is None
    assert re.match(text_rules.NAME_PATTERN, "caf\u00e9 \u732b") is not None
