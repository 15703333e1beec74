"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import Tenant
from app.queue import Queue
from app.runtime import Runtime
from app.services import auth
from app.services.bases import BaseRegistry
from app.storage import Storage

if TYPE_CHECKING:  # app.services.inference imports torch: only once something is served
    from app.services.inference import Serving

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer sk_...`")


def get_runtime(request: Request) -> Runtime:
    """The runtime context create_app built (the only thing kept on app.state)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings_dep(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with Session(bind=runtime.engine, autoflush=False, expire_on_commit=False) as session:
        yield session


def get_storage_dep(runtime: RuntimeDep) -> Storage:
    return runtime.storage


def get_queue(runtime: RuntimeDep) -> Queue:
    return runtime.queue


def get_bases(runtime: RuntimeDep) -> BaseRegistry:
    return runtime.bases


def get_serving(runtime: RuntimeDep) -> Serving:
    """The process's Serving, built on the first request that serves (runtime.serving())."""
    return runtime.serving()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage_dep)]
QueueDep = Annotated[Queue, Depends(get_queue)]
BasesDep = Annotated[BaseRegistry, Depends(get_bases)]
ServingDep = Annotated["Serving", Depends(get_serving)]  # a name only: FastAPI never checks its type


def get_tenant(
    request: Request,
    session: SessionDep,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    # The raw header, so that Basic or a bare key is told to use Bearer (HTTPBearer hides those).
    key = auth.key_from_header(request.headers.get("authorization"))
    return auth.authenticate(session=session, key=key)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


MAX_OFFSET = 2**31 - 1  # beyond any listing; bigger numbers overflow the databases' integers


@dataclass(frozen=True)
class Page:
    """One page of a listing: at most `limit` rows after skipping `offset`."""

    limit: int
    offset: int


def get_page(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page:
    return Page(limit=limit, offset=offset)


PageDep = Annotated[Page, Depends(get_page)]
