"""Reference-safe stored objects: the one place that deletes files from storage.

Stored files are content-addressed and shared (two datasets, or two tenants, may hold the same
image; identical zero-shot models share a delta). A file may be deleted only when no row uses it.
A writer cannot commit its rows before the file exists, so between writing the file and committing
the rows it holds a *pin* (an `object_pins` row) committed before the file is written:

    writer:  pin(keys) [commit] -> write files -> rows + unpin [one commit]
    deleter: lock -> unreferenced(keys) -> unlink -> [commit, unlock]

`pin` and `remove_unreferenced` serialise on one lock (PostgreSQL: a transaction-level advisory
lock; SQLite: the database's write lock, taken by the first statement of each). So a pin is either
committed before the deleter looks (the file is kept) or only after the deleter has finished
unlinking (the writer then writes the file afresh). Rows and live pins are references; a pin left
by a writer that died lapses after `object_pin_ttl_s`, and the next collection removes it together
with the files nothing else uses.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import delete, insert, select, text
from sqlalchemy.orm import Session

from app.models import Image, Model, ObjectPin, new_id, utcnow
from app.storage import Storage

log = logging.getLogger(__name__)

_PG_LOCK_ID = 0x5350_4F42  # arbitrary constant naming this lock among advisory locks


def _lock(session: Session) -> None:
    """Serialise with other pinners/collectors until the session's transaction ends.

    Call as the first statement of a transaction. PostgreSQL: advisory lock. SQLite: nothing here;
    the caller's first statement is a write, which takes the database's single write lock.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})


def pin(*, session: Session, keys: Iterable[str], ttl_s: float) -> str:
    """Commit pending references to `keys`, lapsing after `ttl_s` (settings.object_pin_ttl_s);
    returns the pin id that `unpin` releases.

    The session must have no pending work (its transaction is committed here).
    """
    keys = sorted(set(keys))
    pin_id = new_id()
    if not keys:
        return pin_id
    expires = utcnow() + timedelta(seconds=ttl_s)
    session.commit()  # a fresh transaction, so the lock is its first statement
    _lock(session)
    session.execute(insert(ObjectPin), [{"id": new_id(), "pin_id": pin_id, "key": k, "expires_at": expires}
                                        for k in keys])
    session.commit()
    return pin_id


def unpin(*, session: Session, pin_id: str) -> None:
    """Release a pin, in the caller's transaction (commit it with the rows that now hold the keys)."""
    session.execute(delete(ObjectPin).where(ObjectPin.pin_id == pin_id))


@contextmanager
def pinned(*, session: Session, storage: Storage, keys: Iterable[str], ttl_s: float) -> Iterator[None]:
    """Hold `keys` while the block writes objects derived from them (an export of a delta): a
    deleter keeps them meanwhile, and on exit those whose rows went in the meantime are removed,
    derived objects included. The session must have no pending work."""
    keys = sorted(set(keys))
    pin_id = pin(session=session, keys=keys, ttl_s=ttl_s)
    try:
        yield
    finally:
        session.rollback()
        unpin(session=session, pin_id=pin_id)
        session.commit()
        remove_unreferenced(session=session, storage=storage, keys=keys)


def put(*, session: Session, storage: Storage, data: bytes, ttl_s: float) -> str:
    """Store bytes under a pin that lapses after the TTL (for writers that cannot unpin with
    their row commit); returns the key."""
    key = hashlib.sha256(data).hexdigest()
    pin(session=session, keys=[key], ttl_s=ttl_s)
    return storage.put(data)


def _used(session: Session, keys: set[str]) -> set[str]:
    """Keys among `keys` that an image, a model or a live pin refers to."""
    if not keys:
        return set()
    now = utcnow()
    used = set(session.scalars(select(Image.storage_key).where(Image.storage_key.in_(keys))))
    used |= set(session.scalars(select(Model.delta_key).where(Model.delta_key.in_(keys))))
    used |= set(
        session.scalars(select(ObjectPin.key).where(ObjectPin.key.in_(keys), ObjectPin.expires_at >= now))
    )
    return used


def remove_unreferenced(*, session: Session, storage: Storage, keys: Iterable[str]) -> int:
    """Delete the stored files among `keys` (and of lapsed pins) that nothing refers to.

    Best effort: a file that cannot be removed stays (garbage, never a lost reference). Returns the
    number of files removed. The session must have no pending work.
    """
    session.commit()  # a fresh transaction: the lock (or SQLite's write) comes first
    try:
        _lock(session)
        # SQLite: this DELETE is the transaction's first statement and takes the write lock.
        lapsed = session.scalars(
            delete(ObjectPin).where(ObjectPin.expires_at < utcnow()).returning(ObjectPin.key)
            .execution_options(synchronize_session=False)
        ).all()
        candidates = set(keys) | set(lapsed)
        removed = 0
        for key in candidates - _used(session, candidates):
            try:
                storage.delete(key)
                removed += 1
            except OSError as e:
                log.warning("could not remove stored object %s: %s", key, e)
        session.commit()
        return removed
    except BaseException:
        session.rollback()
        raise
