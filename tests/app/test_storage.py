"""Content-addressed local storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.storage import LocalStorage, Storage, StorageError


def test_put_get_and_content_addressing(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    assert isinstance(store, Storage)
    key = store.put(b"hello")
    assert key == hashlib.sha256(b"hello").hexdigest()
    assert store.put(b"hello") == key  # same content, same file
    assert store.get(key) == b"hello" and store.exists(key)
    assert store.path(key) == tmp_path / key[:2] / key
    with store.open(key) as f:
        assert f.read() == b"hello"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [store.path(key)]  # no temp files left


def test_put_file_and_delete(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "objects")
    src = tmp_path / "delta.bin"
    src.write_bytes(b"x" * 3_000_000)
    key = store.put_file(src)
    assert key == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.get(key) == src.read_bytes()
    store.delete(key)
    store.delete(key)  # deleting a missing key is fine
    assert not store.exists(key)
    with pytest.raises(StorageError):
        store.get(key)


@pytest.mark.parametrize("key", ["../etc/passwd", "a" * 63, "A" * 64, "", "../" + "a" * 61])
def test_malformed_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError):
        LocalStorage(tmp_path).path(key)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    store = LocalStorage(tmp_path)

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.put(b"data")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_derived_objects_live_and_go_with_their_source(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    key, other = store.put(b"image"), store.put(b"other image")
    assert store.get_derived(key, "thumb-128.jpg") is None
    store.put_derived(key, "thumb-128.jpg", b"small")
    store.put_derived(other, "thumb-128.jpg", b"small too")
    assert store.get_derived(key, "thumb-128.jpg") == b"small"
    for bad in ("../x.jpg", "thumb.jpg/..", ".hidden", "a b.jpg", ""):
        with pytest.raises(StorageError):
            store.put_derived(key, bad, b"x")
    store.delete(key)
    assert not store.exists(key) and store.get_derived(key, "thumb-128.jpg") is None
    assert store.get(other) == b"other image" and store.get_derived(other, "thumb-128.jpg") == b"small too"
