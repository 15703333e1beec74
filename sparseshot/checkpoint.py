"""Training checkpoints: one file per run, written atomically, resumed only by the same inputs.

The file is a ``torch.save`` dict (loaded with ``weights_only=True``) holding "key" (`run_key` of the
run's inputs) and the trainer's state (sparseshot.train decides its fields). A file that is
unreadable, from another version or of other inputs is ignored: the run starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparseshot.io import atomic_write

__all__ = ["CHECKPOINT_EVERY_S", "CHECKPOINT_EVERY_STEPS", "CheckpointFile", "run_key"]

CHECKPOINT_EVERY_STEPS = 50
CHECKPOINT_EVERY_S = 30.0
_CHECKPOINT_VERSION = 1


def run_key(method: str, hp: Mapping[str, Any], classes: Sequence[str], labels: Sequence[int],
            fingerprint: str, images: Sequence[Any]) -> str:
    """Identity of a run's inputs (sha256 hex): a checkpoint is only resumed when it matches."""
    h = hashlib.sha256()
    h.update(json.dumps([_CHECKPOINT_VERSION, method, dict(hp), list(classes), list(labels), fingerprint],
                        sort_keys=True, default=str).encode())
    for im in images:
        h.update(repr((getattr(im, "size", None), getattr(im, "mode", None))).encode())
    return h.hexdigest()


class CheckpointFile:
    """The checkpoint of one run at `path` (None: checkpointing off, every call a no-op)."""

    def __init__(self, path: str | os.PathLike[str] | None, key: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.key = key

    def __bool__(self) -> bool:
        return self.path is not None

    def read(self, device: torch.device) -> dict[str, Any] | None:
        """The saved state of this run's inputs, or None (no file, unreadable, other inputs)."""
        if not self.path or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception:
            return None  # unreadable (e.g. from another version): start over
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None
        return state

    def write(self, state: Mapping[str, Any]) -> None:
        """Atomically replace the file with `state` (plus the key)."""
        if not self.path:
            return
        payload = {"key": self.key, **state}
        atomic_write(self.path, lambda fh: torch.save(payload, fh))

    def remove(self) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
