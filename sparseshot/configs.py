"""Typed recipe configs: `SOConfig`, `LoRAConfig`, `ZeroShotConfig` (the one list of hyperparameters).

Each field carries its default, its type and range (a `Kind`) and a one-line doc, so validation
(`validate_hparams`), the defaults (`hparam_defaults`), the field table (`describe`) and the JSON
schema of a job's params (`params_json_schema`) are all derived from the dataclasses below.

Block indices (`positions`) are checked against the towers' depths when they are known: pass
``depths={"vision": n, "text": m}`` (see `sparseshot.base.tower_depths(spec)`), or call
``config.check_against(base)`` once the base model is loaded (`adapt` does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sparseshot.text_rules import DEFAULT_TEMPLATE, check_template  # torch-free: the API schemas import this

if TYPE_CHECKING:  # types only: sparseshot.base needs torch
    from sparseshot.base import BaseModel

__all__ = [
    "CONFIGS",
    "METHODS",
    "Config",
    "FieldDoc",
    "LoRAConfig",
    "SOConfig",
    "ZeroShotConfig",
    "config_for",
    "describe",
    "hparam_defaults",
    "params_json_schema",
    "validate_hparams",
]

METHODS = ("so", "lora", "zeroshot")
ENCODERS = ("vision", "text", "both")


# ==================================================================================================
# Kinds: a field's type, range and check
# ==================================================================================================


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Kind:
    """How one field is checked and described (subclasses per type)."""

    type: ClassVar[str] = "any"

    def check(self, name: str, v: Any) -> Any:
        raise NotImplementedError

    def range(self) -> str:
        return ""

    def schema(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Float(Kind):
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    type: ClassVar[str] = "number"

    def check(self, name: str, v: Any) -> float:
        if not _is_num(v):
            raise ValueError(f"{name} must be a number, got {v!r}")
        below = v <= self.lo if self.lo_open else v < self.lo
        above = v >= self.hi if self.hi_open else v > self.hi
        if below or above:
            raise ValueError(f"{name} must be in {self.range()}, got {v!r}")
        return float(v)

    def range(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def schema(self) -> dict[str, Any]:
        lo = "exclusiveMinimum" if self.lo_open else "minimum"
        hi = "exclusiveMaximum" if self.hi_open else "maximum"
        return {"type": "number", lo: self.lo, hi: self.hi}


@dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int
    type: ClassVar[str] = "integer"

    def check(self, name: str, v: Any) -> int:
        if not _is_int(v):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if not self.lo <= v <= self.hi:
            raise ValueError(f"{name} must be in {self.range()}, got {v!r}")
        return int(v)

    def range(self) -> str:
        return f"[{self.lo}, {self.hi}]"

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True)
class Betas(Kind):
    """A pair of Adam betas, each in [0, 1)."""

    type: ClassVar[str] = "pair of numbers"

    def check(self, name: str, v: Any) -> tuple[float, float]:
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise ValueError(f"{name} must be a pair of numbers, got {v!r}")
        each = Float(0.0, 1.0, hi_open=True)
        return each.check(f"{name}[0]", v[0]), each.check(f"{name}[1]", v[1])

    def range(self) -> str:
        return "each in [0.0, 1.0)"

    def schema(self) -> dict[str, Any]:
        item = {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0}
        return {"type": "array", "items": item, "minItems": 2, "maxItems": 2}


@dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...]
    type: ClassVar[str] = "string"

    def check(self, name: str, v: Any) -> str:
        if v not in self.values:
            options = ", ".join(repr(x) for x in self.values)
            raise ValueError(f"{name} must be one of {options}, got {v!r}")
        return str(v)

    def range(self) -> str:
        return " | ".join(self.values)

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.values)}


@dataclass(frozen=True)
class Positions(Kind):
    """"all" or a non-empty list of block indices (negative counts from the end of each tower)."""

    type: ClassVar[str] = '"all" or list of integers'

    def check(self, name: str, v: Any) -> str | tuple[int, ...]:
        if v == "all":
            return "all"
        if isinstance(v, list | tuple) and v and all(_is_int(i) for i in v):
            return tuple(int(i) for i in v)
        raise ValueError(f"{name} must be 'all' or a non-empty list of block indices, got {v!r}")

    def range(self) -> str:
        return "each index in [-depth, depth) of every selected tower"

    def schema(self) -> dict[str, Any]:
        many = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
        return {"anyOf": [{"const": "all"}, many]}


@dataclass(frozen=True)
class Template(Kind):
    type: ClassVar[str] = "string"

    def check(self, name: str, v: Any) -> str:
        return check_template(v)

    def range(self) -> str:
        return 'exactly one "{}", replaced by the class name'

    def schema(self) -> dict[str, Any]:
        return {"type": "string"}


def _hp(default: Any, kind: Kind, doc: str) -> Any:
    """A config field: default, kind (type, range, check) and one-line doc."""
    return field(default=default, metadata={"kind": kind, "doc": doc})


# ==================================================================================================
# Field descriptions and the shared behaviour of configs
# ==================================================================================================


@dataclass(frozen=True)
class FieldDoc:
    """One hyperparameter as documented: name, type, default, range and a one-line doc."""

    name: str
    type: str
    default: Any
    range: str
    doc: str


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


_C = TypeVar("_C", bound="_Config")


@dataclass(frozen=True)
class _Config:
    method: ClassVar[str]

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        return dataclasses.fields(cls)

    @classmethod
    def from_params(cls: type[_C], params: Mapping[str, Any] | None = None,
                    depths: Mapping[str, int] | None = None) -> _C:
        """The config of the defaults overridden by `params`; ValueError naming the bad key."""
        params = dict(params or {})
        names = [f.name for f in cls.fields()]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) for method {cls.method!r}: {', '.join(unknown)} "
                             f"(allowed: {', '.join(sorted(names))})")
        values = {f.name: f.metadata["kind"].check(f.name, params.get(f.name, f.default))
                  for f in cls.fields()}
        config = cls(**values)
        if depths is not None:
            config.check_depths(depths)
        return config

    def to_params(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in self.fields()}

    @classmethod
    def describe(cls) -> list[FieldDoc]:
        return [FieldDoc(f.name, f.metadata["kind"].type, _jsonable(f.default), f.metadata["kind"].range(),
                         f.metadata["doc"]) for f in cls.fields()]

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema (draft 2020-12 subset) of the params object of this method."""
        props = {f.name: {**f.metadata["kind"].schema(), "default": _jsonable(f.default),
                          "description": f.metadata["doc"]} for f in cls.fields()}
        return {"type": "object", "properties": props, "additionalProperties": False}

    def check_depths(self, depths: Mapping[str, int]) -> None:
        """ValueError when a block index lies outside a selected tower (depths: tower -> blocks)."""
        positions: str | tuple[int, ...] = getattr(self, "positions", "all")
        if isinstance(positions, str):  # "all"
            return
        encoder = getattr(self, "encoder", "both")
        for tower in (("vision", "text") if encoder == "both" else (encoder,)):
            n = depths.get(tower)
            bad = [i for i in positions if n is not None and not -n <= i < n]
            if bad:
                raise ValueError(f"positions {bad} out of range for the {tower} tower ({n} blocks)")

    def check_against(self, base: BaseModel) -> None:
        """check_depths with the depths of a loaded base model."""
        from sparseshot.lora import tower_depths  # lazy: lora needs torch, this module stays torch-free

        self.check_depths(tower_depths(base.model))


# ==================================================================================================
# The recipes
# ==================================================================================================

_LR = Float(0.0, 10.0, lo_open=True)
_ENCODER = Choice(ENCODERS)
_SEED = Int(0, 2**31 - 1)
_BATCH = Int(1, 65536)
_TEMPLATE_DOC = 'prompt template; its one "{}" is replaced by the class name'


@dataclass(frozen=True)
class SOConfig(_Config):
    """Sparse Optimization (the paper's recipe) on the attention and MLP matrices."""

    method: ClassVar[str] = "so"
    lr: float = _hp(2e-4, _LR, "peak learning rate of the cosine schedule (to 1e-6)")
    betas: tuple[float, float] = _hp((0.9, 0.999), Betas(), "Adam betas (beta1, beta2)")
    density: float = _hp(5e-4, Float(0.0, 1.0, lo_open=True),
                         "fraction of each matrix's entries in the random gradient support")
    refresh_every: int = _hp(10, Int(1, 2**31), "steps between redraws of the gradient support (T)")
    batch_size: int = _hp(32, _BATCH, "images per step (at most the number of images)")
    n_iters: int = _hp(2000, Int(1, 10**7), "planned steps per shot (steps = n_iters x shots)")
    early_stop_loss: float = _hp(0.01, Float(0.0, 1e9), "stop once an epoch's mean loss falls below")
    delta_budget: float = _hp(0.05, Float(0.0, 1.0, lo_open=True),
                              "fraction of the trained entries the stored delta may hold (1 = all changed)")
    refine_fraction: float = _hp(0.25, Float(0.0, 1.0),
                                 "re-training steps on the kept entries, as a fraction of the steps run")
    refine_lr_scale: float = _hp(0.1, Float(0.0, 1.0, lo_open=True),
                                 "peak learning rate of the re-training, as a fraction of lr")
    encoder: str = _hp("both", _ENCODER, "towers to train: vision, text or both")
    positions: str | tuple[int, ...] = _hp("all", Positions(), 'blocks to train: "all" or indices')
    template: str = _hp(DEFAULT_TEMPLATE, Template(), _TEMPLATE_DOC)
    seed: int = _hp(0, _SEED, "seed of data order, augmentation and supports")


@dataclass(frozen=True)
class LoRAConfig(_Config):
    """CLIP-LoRA: low-rank adapters on q, k, v."""

    method: ClassVar[str] = "lora"
    rank: int = _hp(2, Int(1, 4096), "adapter rank r")
    alpha: float = _hp(1.0, Float(0.0, 1e6, lo_open=True), "adapter scale is alpha / sqrt(r)")
    dropout: float = _hp(0.25, Float(0.0, 1.0, hi_open=True), "dropout on the adapters' input")
    lr: float = _hp(2e-4, _LR, "peak learning rate of the cosine schedule (to 1e-6)")
    weight_decay: float = _hp(1e-2, Float(0.0, 1e3), "AdamW weight decay")
    batch_size: int = _hp(32, _BATCH, "images per step (at most the number of images)")
    n_iters: int = _hp(500, Int(1, 10**7), "steps per shot (steps = n_iters x shots)")
    encoder: str = _hp("both", _ENCODER, "towers to adapt: vision, text or both")
    positions: str | tuple[int, ...] = _hp("all", Positions(), 'blocks to adapt: "all" or indices')
    template: str = _hp(DEFAULT_TEMPLATE, Template(), _TEMPLATE_DOC)
    seed: int = _hp(0, _SEED, "seed of data order, augmentation, dropout and initialisation")


@dataclass(frozen=True)
class ZeroShotConfig(_Config):
    """No training: class embeddings of the base text tower."""

    method: ClassVar[str] = "zeroshot"
    template: str = _hp(DEFAULT_TEMPLATE, Template(), _TEMPLATE_DOC)


Config = SOConfig | LoRAConfig | ZeroShotConfig  # the config of some method
CONFIGS: dict[str, type[Config]] = {"so": SOConfig, "lora": LoRAConfig, "zeroshot": ZeroShotConfig}


def _config_class(method: str) -> type[Config]:
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return CONFIGS[method]


def config_for(method: str, params: Mapping[str, Any] | None = None, *,
               depths: Mapping[str, int] | None = None) -> Config:
    """The typed config (SOConfig | LoRAConfig | ZeroShotConfig) of `method` with `params`."""
    return _config_class(method).from_params(params, depths)


def validate_hparams(method: str, params: Mapping[str, Any] | None = None, *,
                     depths: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Defaults of `method` merged with `params`, checked and normalised (JSON-able values).

    Raises ValueError naming the offending key on an unknown key, a wrong type, a bad range or
    (with `depths`) a block index beyond a tower's depth.
    """
    return config_for(method, params, depths=depths).to_params()


def hparam_defaults(method: str) -> dict[str, Any]:
    """The recipe's default hyperparameters of `method` (a fresh dict)."""
    return _config_class(method)().to_params()


def describe(method: str) -> list[FieldDoc]:
    """name, type, default, range and doc of every hyperparameter of `method`."""
    return _config_class(method).describe()


def params_json_schema(method: str) -> dict[str, Any]:
    """JSON schema of the params object of `method` (for the service's job schema and docs)."""
    return _config_class(method).json_schema()

