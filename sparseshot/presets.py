"""Named training presets and the measured step times behind a job's time estimate.

A preset is a plain dict of recipe hyperparameters per method, checked through
`sparseshot.configs.validate_hparams` like any job's `params` (which override a preset's values):

- ``standard``: the paper's recipe, i.e. the recipe defaults (`sparseshot.hparam_defaults`);
- ``quick``: a tenth of the steps with a 5x larger learning rate, for a first model in minutes;
- ``thorough``: twice the standard steps.

`STEP_SECONDS` holds seconds per training step measured with ``python -m benchmarks.job_step``
(batch 32 = a 4-shot, 10-class job, 10 class prompts) per (base architecture, method, device);
a device without a measured figure gives no estimate (None) rather than a guess.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from sparseshot.configs import validate_hparams

__all__ = ["DEFAULT_PRESET", "PRESETS", "STEP_SECONDS", "estimate_seconds", "preset_params", "step_seconds"]

DEFAULT_PRESET = "standard"

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"so": {"n_iters": 200, "lr": 1e-3}, "lora": {"n_iters": 50, "lr": 1e-3}, "zeroshot": {}},
    "standard": {"so": {}, "lora": {}, "zeroshot": {}},
    "thorough": {"so": {"n_iters": 4000}, "lora": {"n_iters": 1000}, "zeroshot": {}},
}

# Seconds per step at batch MEASURED_BATCH, by (base architecture, method, device type).
# Measured on 2 shared CPU cores (x86_64) with `python -m benchmarks.job_step --threads 2` (standard
# preset); the faster of two runs where two were made (other processes loaded the machine).
MEASURED_BATCH = 32
STEP_SECONDS: dict[tuple[str, str, str], float] = {
    ("sparseshot-tiny", "so", "cpu"): 0.223,
    ("sparseshot-tiny", "lora", "cpu"): 0.043,
    ("ViT-B-16", "so", "cpu"): 28.6,
    ("ViT-B-16", "lora", "cpu"): 57.7,
}
# Architecture whose figure stands in for a base without its own (the service's default base).
FALLBACK_ARCH = "ViT-B-16"


def preset_params(preset: str, method: str, params: Mapping[str, Any] | None = None, *,
                  depths: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The preset's hyperparameters of `method` with `params` on top, validated (defaults merged).

    Raises ValueError on an unknown preset or method and on bad hyperparameters.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    by_method = PRESETS[preset]
    if method not in by_method:
        raise ValueError(f"preset {preset!r} has no settings for method {method!r}")
    return validate_hparams(method, {**copy.deepcopy(by_method[method]), **dict(params or {})}, depths=depths)


def base_arch(spec: str) -> str:
    """The architecture part of a base spec: "ViT-B-16:openai" -> "ViT-B-16"."""
    return spec.split(":", 1)[0] if not spec.startswith(("hf-hub:", "local-dir:")) else spec


def step_seconds(base_spec: str, method: str, device: str) -> float | None:
    """Measured seconds per step at MEASURED_BATCH, the fallback architecture's, or None (unmeasured)."""
    dev = device.split(":", 1)[0]
    for arch in (base_arch(base_spec), FALLBACK_ARCH):
        if (arch, method, dev) in STEP_SECONDS:
            return STEP_SECONDS[(arch, method, dev)]
    return None


def estimate_seconds(base_spec: str, method: str, device: str, *, steps: int, batch: int) -> float | None:
    """steps x the measured step time, scaled linearly from MEASURED_BATCH to `batch` images.

    An upper bound for SO (which may stop early); None where the device has no measured figure.
    """
    per_step = step_seconds(base_spec, method, device)
    if per_step is None or steps <= 0:
        return None if per_step is None else 0.0
    return round(steps * per_step * batch / MEASURED_BATCH, 1)
