"""The delta file: one safetensors file whose metadata indexes the entries and carries a digest.

Tensors: ``t{i}.values`` / ``t{i}.indices`` per entry, ``l{i}.B`` / ``l{i}.A`` per low-rank block,
``extra.{name}`` per extra. Metadata fields: ``format``, ``format_version``, ``index`` (JSON list of
the entries in order), ``extras`` (JSON list of names), ``meta`` (the user meta, JSON) and
``sha256`` over all other fields and every tensor (`_canonical_digest`), checked on read. The JSON
header is written canonically, so the same delta always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import safetensors.torch
import torch

from sparseshot.delta_entries import DeltaEntry, DeltaError, LowRankEntry, lowrank_entry, validate_entry
from sparseshot.fingerprint import tensor_bytes

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "DeltaContents", "decode", "encode"]

FORMAT_NAME = "sparseshot-delta"
FORMAT_VERSION = 1

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPE_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


class DeltaContents(NamedTuple):
    """What a delta file holds, in file order."""

    meta: dict[str, Any]
    entries: list[DeltaEntry]
    lowrank: list[LowRankEntry]
    extras: dict[str, torch.Tensor]


def encode(contents: DeltaContents) -> bytes:
    """The file's bytes (a pure function of the contents); DeltaError when meta is not JSON."""
    tensors, header = _tensors_and_header(contents)
    return _canonical_file(safetensors.torch.save(tensors, metadata=header))


def decode(data: bytes) -> DeltaContents:
    """Read and verify a file's bytes; DeltaError if it is not a delta, is truncated or was modified."""
    header = _read_safetensors_header(data)
    meta_fields = header.get("__metadata__")
    if not isinstance(meta_fields, dict) or meta_fields.get("format") != FORMAT_NAME:
        raise DeltaError("not a sparseshot delta (no sparseshot-delta metadata in the file)")
    version = meta_fields.get("format_version")
    if version != str(FORMAT_VERSION):
        raise DeltaError(f"unsupported delta format version {version!r} (this library reads "
                         f"{FORMAT_VERSION})")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error type for malformed files
        raise DeltaError(f"corrupted or truncated delta file: {e}") from None
    if _canonical_digest(meta_fields, tensors) != meta_fields.get("sha256"):
        raise DeltaError("checksum mismatch: the delta file was modified or corrupted")
    try:
        return _contents(meta_fields, tensors)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DeltaError):
            raise
        raise DeltaError(f"inconsistent delta file: {e!r}") from None


def _tensors_and_header(contents: DeltaContents) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (none sharing memory) and its metadata fields, digest included."""
    tensors, index = _tensors_and_index(contents)
    try:
        meta_json = json.dumps(contents.meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DeltaError(f"delta meta is not JSON-serialisable: {e}") from None
    tensors = _unshare(tensors)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "index": json.dumps(index),
        "extras": json.dumps(sorted(contents.extras)),
        "meta": meta_json,
    }
    header["sha256"] = _canonical_digest(header, tensors)
    return tensors, header


def _tensors_and_index(contents: DeltaContents) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """name -> tensor of every entry, block and extra, and the index describing the entries in order."""
    tensors: dict[str, torch.Tensor] = {}
    index: list[dict[str, Any]] = []
    for i, e in enumerate(contents.entries):
        key = f"t{i}"
        tensors[f"{key}.values"] = e.values.contiguous()
        if e.indices is not None:
            tensors[f"{key}.indices"] = e.indices.contiguous()
        index.append({"kind": "tensor", "key": key, "name": e.name, "shape": list(e.shape),
                      "dtype": _DTYPE_NAMES[e.dtype], "encoding": e.encoding, "mode": e.mode,
                      "nnz": e.nnz})
    for i, lr in enumerate(contents.lowrank):
        key = f"l{i}"
        tensors[f"{key}.B"] = lr.B
        tensors[f"{key}.A"] = lr.A
        index.append({"kind": "lowrank", "key": key, "name": lr.name, "row_start": lr.row_start,
                      "scale": lr.scale, "param_numel": lr.param_numel})
    for name, t in contents.extras.items():
        tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
    return tensors, index


def _contents(fields: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> DeltaContents:
    """The entries the index lists, checked (KeyError, TypeError, ValueError when inconsistent)."""
    contents = DeltaContents(dict(json.loads(fields["meta"]) or {}), [], [], {})
    for item in json.loads(fields["index"]):
        key = item["key"]
        if item["kind"] == "lowrank":
            contents.lowrank.append(lowrank_entry(
                item["name"], int(item["row_start"]), tensors[f"{key}.B"], tensors[f"{key}.A"],
                float(item["scale"]), param_numel=item.get("param_numel"),
            ))
            continue
        entry = DeltaEntry(
            name=item["name"], shape=tuple(int(s) for s in item["shape"]),
            dtype=_DTYPE_BY_NAME[item["dtype"]], encoding=item["encoding"], mode=item["mode"],
            values=tensors[f"{key}.values"], indices=tensors.get(f"{key}.indices"), nnz=int(item["nnz"]),
        )
        validate_entry(entry)
        contents.entries.append(entry)
    for name in json.loads(fields["extras"]):
        contents.extras[name] = tensors[f"extra.{name}"]
    return contents


def _canonical_digest(header: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the metadata fields (except the digest itself) and all tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(header):
        if key != "sha256":
            digest.update(f"{key}\0{header[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors whose storage another tensor already uses (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _read_safetensors_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise DeltaError("file is too short to be a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise DeltaError(f"header claims {n} bytes but only {len(data) - 8} follow (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaError(f"header is not valid JSON (corrupted?): {e}") from None
    if not isinstance(header, dict):
        raise DeltaError("header is not a JSON object (corrupted?)")
    return header


def _canonical_file(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written canonically (sorted keys, no spaces).

    safetensors writes the `__metadata__` map in hash order, which changes from process to process;
    re-encoding the header makes `to_bytes` a pure function of the delta (same delta, same bytes,
    same content address). The tensor data is untouched: its offsets are relative to the end of the
    header, whose length is padded to a multiple of 8 with spaces as safetensors does."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]
