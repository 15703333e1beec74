"""The runtime context: what one process shares (settings, database engine, storage, queue, the
base-model registry, and serving once something is served).

Built once where a process is assembled: `app.main.create_app` for the API (kept on
`app.state.runtime`, read by the dependencies in app.api.deps) and the worker's process init
(worker.context); in-process tools (benchmarks/serving.py) build their own. Code below receives
it, or the part it needs, as an argument.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from app.core.config import Settings
from app.db import make_engine
from app.queue import Queue, UnconfiguredQueue
from app.services.bases import BaseRegistry
from app.storage import Storage, get_storage

if TYPE_CHECKING:  # app.services.inference imports torch: not in a worker's main process
    from app.services.inference import Serving


class _ServingSlot:
    """A process's Serving, built on first use and closed with its Runtime."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._serving: Serving | None = None

    def get(self, settings: Settings, bases: BaseRegistry) -> Serving:
        with self._lock:
            if self._serving is None:
                from app.services.inference import Serving

                self._serving = Serving(settings, bases)
            return self._serving

    def close(self) -> None:
        with self._lock:
            old, self._serving = self._serving, None
        if old is not None:
            old.close()


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    storage: Storage
    queue: Queue
    bases: BaseRegistry  # the process's base models (loads, remembered failures, warm-up)
    _serving: _ServingSlot = field(default_factory=_ServingSlot, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, settings: Settings, *, queue: Queue | None = None) -> Runtime:
        """A new engine, the local storage and a base-model registry for `settings`; `queue`
        defaults to none configured."""
        return cls(settings=settings, engine=make_engine(settings.database_url),
                   storage=get_storage(settings), queue=queue or UnconfiguredQueue(),
                   bases=BaseRegistry(settings))

    def serving(self) -> Serving:
        """The process's Serving (an engine per base, the batch scheduler), built on first use:
        it imports torch, which a worker's main process never loads."""
        return self._serving.get(self.settings, self.bases)

    def close(self) -> None:
        """Stop serving, if it was started, and close the pooled database connections."""
        self._serving.close()
        self.engine.dispose()
