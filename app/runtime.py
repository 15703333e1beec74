"""The runtime context: what one process shares (settings, database engine, storage, queue).

Built once where a process is assembled: `app.main.create_app` for the API (kept on
`app.state.runtime`, read by the dependencies in app.api.deps) and the worker's process init
(worker.context). Code below receives it, or the part it needs, as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from app.core.config import Settings
from app.db import make_engine
from app.queue import Queue, UnconfiguredQueue
from app.storage import Storage, get_storage


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    storage: Storage
    queue: Queue
    # Slot for the base-model registry, not wired: app.services.bases is the one registry of a
    # process and is also reached without a Runtime (the serving path under
    # app.services.models.classify, which benchmarks/serving.py drives in-process; `sparseshot
    # serve`'s warm-up before the API's Runtime exists). A registry per Runtime would split the
    # loads and the remembered failures between those callers.
    bases: object | None = None

    @classmethod
    def build(cls, settings: Settings, *, queue: Queue | None = None) -> Runtime:
        """A new engine and the local storage for `settings`; `queue` defaults to none configured."""
        return cls(settings=settings, engine=make_engine(settings.database_url),
                   storage=get_storage(settings), queue=queue or UnconfiguredQueue())

    def close(self) -> None:
        """Close the pooled database connections."""
        self.engine.dispose()
