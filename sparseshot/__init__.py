"""sparseshot: few-shot CLIP adaptation with Sparse Optimization (SO) and sparse weight deltas.

The pure ML library. It never imports the web service, the queue or the database layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# What the lazy exports below resolve to, for type checkers.
if TYPE_CHECKING:
    from sparseshot.base import BaseModel as BaseModel
    from sparseshot.base import BaseModelError as BaseModelError
    from sparseshot.base import load_base as load_base
    from sparseshot.classifier import Classifier as Classifier
    from sparseshot.configs import config_for as config_for
    from sparseshot.delta import DeltaError as DeltaError
    from sparseshot.delta import SparseDelta as SparseDelta
    from sparseshot.optim import SO as SO
    from sparseshot.recipe import AdaptResult as AdaptResult
    from sparseshot.recipe import Cancelled as Cancelled
    from sparseshot.recipe import Progress as Progress
    from sparseshot.recipe import adapt as adapt
    from sparseshot.recipe import adapt_budgets as adapt_budgets
    from sparseshot.recipe import hparam_defaults as hparam_defaults
    from sparseshot.recipe import validate_hparams as validate_hparams
    from sparseshot.sparse_grad import enable_sparse_grads as enable_sparse_grads
    from sparseshot.sparse_grad import use_plain_attention as use_plain_attention

# Public name -> module that defines it. Resolved lazily so that `import sparseshot` stays cheap
# for callers that only need one part (the service imports the API schemas without torch work).
_EXPORTS = {
    "SO": "sparseshot.optim",
    "enable_sparse_grads": "sparseshot.sparse_grad",
    "use_plain_attention": "sparseshot.sparse_grad",
    "SparseDelta": "sparseshot.delta",
    "DeltaError": "sparseshot.delta",
    "BaseModel": "sparseshot.base",
    "BaseModelError": "sparseshot.base",
    "load_base": "sparseshot.base",
    "adapt": "sparseshot.recipe",
    "adapt_budgets": "sparseshot.recipe",
    "config_for": "sparseshot.configs",
    "AdaptResult": "sparseshot.recipe",
    "Cancelled": "sparseshot.recipe",
    "Progress": "sparseshot.recipe",
    "hparam_defaults": "sparseshot.recipe",
    "validate_hparams": "sparseshot.recipe",
    "Classifier": "sparseshot.classifier",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseshot' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
