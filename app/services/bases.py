"""The base-model registry: one `BaseModel` per spec, shared by serving and training.

`sparseshot.load_base` loads once per (spec, device); a `BaseRegistry` adds the service's settings
(device, download directory, default spec), background warm-up, and the memory of a failed load:
the error (what was tried, which setting to change) is kept and raised again at once, without a
new try, until a retry is due, `RETRY_FIRST_S` after the first failure and doubling up to
`RETRY_MAX_S`. So a base that cannot load (offline without cached weights, a wrong path) fails
requests and jobs fast; `unavailable` tells the API to refuse new jobs (503 + Retry-After), and
/readyz gives the error.

One registry per process, a field of its `app.runtime.Runtime` (`runtime.bases`): the API, the
embedded worker and Celery worker processes all call `runtime.bases.get`. Importing this module
does not import torch (`sparseshot.base` is loaded where a base is), so a worker's main process
builds its registry without it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sparseshot
from app.core.config import Settings

if TYPE_CHECKING:  # sparseshot.base imports torch: only where a base is loaded (not a worker's main process)
    from sparseshot.base import BaseModel, BaseModelError

log = logging.getLogger(__name__)

RETRY_FIRST_S = 30.0  # after the first failed load; doubles with each further failure
RETRY_MAX_S = 600.0
RETRYING_AFTER_S = 5  # Retry-After while a due retry is loading

HINT = ("To fix: set SPARSESHOT_BASE_MODEL to a base whose weights this machine has (a checkpoint "
        "path, NAME:/path/to/checkpoint.pt, or sparseshot-tiny:random to try the service), point "
        "SPARSESHOT_MODEL_DOWNLOAD_DIR at a download cache that holds them, or, without internet, "
        "download them once on a connected machine into that cache and set HF_HUB_OFFLINE=1 so "
        "that only the cache is looked at.")


@dataclass(frozen=True)
class _Failure:
    error: str  # the full message: what was tried, why it failed, what to change
    failures: int  # consecutive failed loads
    retry_at: float  # clock() when the next load may be tried


class BaseRegistry:
    """The loaded bases and remembered failures of one process, under `settings` (default spec,
    device, download folder). `clock` times the backoff (tests replace it)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._bases: dict[str, BaseModel] = {}
        self._failures: dict[str, _Failure] = {}
        self._load_lock = threading.Lock()  # held while a base model loads (seconds)
        self._state_lock = threading.Lock()  # quick checks of the dicts above, never held while loading
        self._warming: set[str] = set()

    def get(self, spec: str | None = None) -> BaseModel:
        """The BaseModel for `spec` (default: settings.base_model), loaded once; BaseModelError if
        not (at once, without trying again, while a remembered failure's retry is not yet due)."""
        spec = spec or self.settings.base_model
        base = self._bases.get(spec)
        if base is not None:
            return base
        self._raise_if_backing_off(spec)
        with self._load_lock:
            base = self._bases.get(spec)
            if base is not None:
                return base
            self._raise_if_backing_off(spec)  # another thread's load just failed
            try:
                base = sparseshot.load_base(spec, device=self.settings.device or None,
                                            cache_dir=self.settings.model_download_dir)
            except Exception as e:
                raise self._remember(spec, e) from None
            with self._state_lock:
                self._bases[spec] = base
                self._failures.pop(spec, None)
            return base

    def _raise_if_backing_off(self, spec: str) -> None:
        failure = self._failures.get(spec)
        if failure is not None:
            wait = failure.retry_at - self.clock()
            if wait > 0:
                raise sparseshot.BaseModelError(f"{failure.error} (next try in {math.ceil(wait)} s)")

    def _remember(self, spec: str, e: Exception) -> BaseModelError:
        """Record a failed load of `spec`; the error to raise (what was tried, what to change)."""
        settings = self.settings
        with self._state_lock:
            failures = self._failures[spec].failures + 1 if spec in self._failures else 1
            delay = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
            cache = settings.model_download_dir or "the library's default download cache"
            error = (f"base model {spec!r} could not be loaded (tried: load_base({spec!r}) on device "
                     f"{settings.device or 'auto'}, weights from {cache}; failure {failures}, next try "
                     f"after {delay:g} s): {type(e).__name__}: {e}. {HINT}")
            self._failures[spec] = _Failure(error=error, failures=failures, retry_at=self.clock() + delay)
        log.error("%s", error)
        return sparseshot.BaseModelError(error)

    def warm_up(self, spec: str | None = None) -> None:
        """Load the base model in a background thread (once at a time per spec)."""
        spec = spec or self.settings.base_model
        with self._state_lock:
            if spec in self._bases or spec in self._warming:
                return
            self._warming.add(spec)

        def load() -> None:
            try:
                self.get(spec)
            except Exception as e:
                log.debug("base model %s not loaded: %s", spec, e)  # logged once per failure by _remember
            finally:
                with self._state_lock:
                    self._warming.discard(spec)

        threading.Thread(target=load, name="base-warm-up", daemon=True).start()

    def ready(self, spec: str | None = None) -> bool:
        """True once the default (or given) base model is loaded; never blocks (starts loading it)."""
        spec = spec or self.settings.base_model
        with self._state_lock:
            if spec in self._bases:
                return True
        self.warm_up(spec)
        return False

    def unavailable(self, spec: str) -> tuple[str, int] | None:
        """(error, Retry-After seconds) while the last load of `spec` failed, else None (loaded, or
        never tried or loading: not known to fail). A retry that is due is started in the background."""
        with self._state_lock:
            failure = None if spec in self._bases else self._failures.get(spec)
        if failure is None:
            return None
        wait = failure.retry_at - self.clock()
        if wait <= 0:
            self.warm_up(spec)
            return failure.error, RETRYING_AFTER_S
        return failure.error, max(1, math.ceil(wait))

    def error(self, spec: str | None = None) -> str | None:
        """The last load error of `spec`, if any (for /readyz details)."""
        failure = self._failures.get(spec or self.settings.base_model)
        return failure.error if failure is not None else None
