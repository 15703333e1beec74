"""The process's base-model registry: one `BaseModel` per spec, shared by serving and training.

`sparseshot.load_base` loads once per (spec, device); this module adds the service's settings
(device, download directory), background warm-up and the last load error for /readyz. The API,
the embedded worker and Celery worker processes all call `get_base`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import sparseshot
from app.core.config import get_settings

if TYPE_CHECKING:
    from sparseshot.base import BaseModel

log = logging.getLogger(__name__)

_bases: dict[str, BaseModel] = {}
_errors: dict[str, str] = {}
_load_lock = threading.Lock()  # held while a base model loads (seconds)
_state_lock = threading.Lock()  # quick checks of the dicts above, never held while loading
_warming: set[str] = set()


def get_base(spec: str | None = None) -> BaseModel:
    """The BaseModel for `spec` (default: settings.base_model), loaded once; BaseModelError if not."""
    settings = get_settings()
    spec = spec or settings.base_model
    base = _bases.get(spec)
    if base is not None:
        return base
    with _load_lock:
        base = _bases.get(spec)
        if base is None:
            try:
                base = sparseshot.load_base(spec, device=settings.device or None,
                                            cache_dir=settings.model_download_dir)
            except Exception as e:
                _errors[spec] = f"{type(e).__name__}: {e}"
                raise
            with _state_lock:
                _bases[spec] = base
                _errors.pop(spec, None)
        return base


def warm_up(spec: str | None = None) -> None:
    """Load the base model in a background thread (once at a time per spec)."""
    spec = spec or get_settings().base_model
    with _state_lock:
        if spec in _bases or spec in _warming:
            return
        _warming.add(spec)

    def load() -> None:
        try:
            get_base(spec)
        except Exception as e:
            log.error("base model %s could not be loaded: %s", spec, e)
        finally:
            with _state_lock:
                _warming.discard(spec)

    threading.Thread(target=load, name="base-warm-up", daemon=True).start()


def base_ready(spec: str | None = None) -> bool:
    """True once the default (or given) base model is loaded; never blocks (starts loading it)."""
    spec = spec or get_settings().base_model
    with _state_lock:
        if spec in _bases:
            return True
    warm_up(spec)
    return False


def base_error(spec: str | None = None) -> str | None:
    """The last load error of `spec`, if any (for /readyz details)."""
    return _errors.get(spec or get_settings().base_model)


def reset() -> None:
    """Forget the registered bases (tests)."""
    with _load_lock, _state_lock:
        _bases.clear()
        _errors.clear()
