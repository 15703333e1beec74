"""Content-addressed file storage for images and deltas.

Keys are the sha256 hex digest of the content, so names never come from clients and identical
content is stored once. `Storage` is the interface an object-store backend (S3) can implement;
`LocalStorage` keeps files under a folder and writes them atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from app.core.config import Settings, get_settings
from sparseshot.io import atomic_write

_KEY = re.compile(r"^[0-9a-f]{64}$")
_DERIVED = re.compile(r"^[a-z0-9]+(-[0-9]+)?\.[a-z0-9]+$")  # e.g. thumb-128.jpg
_CHUNK = 1024 * 1024


class StorageError(Exception):
    """A key is malformed or missing."""


@runtime_checkable
class Storage(Protocol):
    """What services use: content-addressed put/get/delete, and a local path to stream a file."""

    def path(self, key: str) -> Path: ...
    def put(self, data: bytes) -> str: ...
    def put_file(self, path: str | os.PathLike[str]) -> str: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def put_derived(self, key: str, name: str, data: bytes) -> None: ...
    def get_derived(self, key: str, name: str) -> bytes | None: ...
    def derived_path(self, key: str, name: str) -> Path: ...


def _check_derived(name: str) -> str:
    if not isinstance(name, str) or not _DERIVED.match(name):
        raise StorageError(f"invalid derived object name {name!r}")
    return name


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    """Files at `root/ab/abcdef…` (first two hex digits fan out the folders)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / key[:2] / key

    def _write_atomic(self, key: str, src: BinaryIO) -> None:
        # Rewritten even when present: a concurrent delete of the same content cannot
        # leave a just-uploaded key without its file.
        atomic_write(self.path(key), lambda out: shutil.copyfileobj(src, out, _CHUNK))

    def put(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        self._write_atomic(key, io.BytesIO(data))
        return key

    def put_file(self, path: str | os.PathLike[str]) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            key = digest.hexdigest()
            f.seek(0)
            self._write_atomic(key, f)
        return key

    def get(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError as e:
            raise StorageError(f"no stored object {key}") from e

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the object and every object derived from it (thumbnails)."""
        path = self.path(key)
        for derived in path.parent.glob(f"{key}.*"):
            derived.unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    # Derived objects: a cache of files computed from an object (a thumbnail of an image), stored
    # beside it as `<key>.<name>`. Addressed by the source's content, so never stale; dropped with it.

    def derived_path(self, key: str, name: str) -> Path:
        return self.path(key).with_name(f"{key}.{_check_derived(name)}")

    def put_derived(self, key: str, name: str, data: bytes) -> None:
        atomic_write(self.derived_path(key, name), lambda out: out.write(data))

    def get_derived(self, key: str, name: str) -> bytes | None:
        try:
            return self.derived_path(key, name).read_bytes()
        except FileNotFoundError:
            return None


def get_storage(settings: Settings | None = None) -> LocalStorage:
    """The local storage under the settings' data folder (default: the process settings)."""
    return LocalStorage((settings or get_settings()).storage_dir)
