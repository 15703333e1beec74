"""sparseshot: few-shot CLIP adaptation with Sparse Optimization (SO) and sparse weight deltas.

The pure ML library. It never imports the web service, the queue or the database layer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
