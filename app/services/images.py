"""Checking uploaded images and archives against the service's input limits."""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from app.core.config import Settings
from app.errors import InvalidInput, TooLarge

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_HIDDEN = re.compile(r"(^|/)(\.|__MACOSX/)")


class Rejected(Exception):
    """One file refused, with the reason shown to the client."""

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason  # short metric label


@dataclass
class CheckedImage:
    data: bytes
    sha256: str
    format: str
    width: int
    height: int


def read_limited(f: BinaryIO, limit: int) -> bytes:
    """Read at most `limit` bytes; Rejected when there is more."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise Rejected(f"file is over the limit of {limit} bytes", "too_large")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"image has too many pixels (decompression bomb): {e}", "too_many_pixels") from e
    except UnidentifiedImageError as e:
        raise Rejected("not an image (or a format that cannot be read)", "not_image") from e
    except Exception as e:  # malformed headers surface as assorted errors
        raise Rejected(f"not a readable image: {e}", "not_image") from e
    width, height = im.size
    if width * height > max_pixels:
        raise Rejected(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            "too_many_pixels",
        )
    if im.format not in SUPPORTED_FORMATS:
        raise Rejected(
            f"unsupported image format {im.format}; use one of {', '.join(SUPPORTED_FORMATS)}",
            "unsupported_format",
        )
    return im


def _decode(data: bytes, settings: Settings) -> tuple[CheckedImage, Image.Image]:
    if not data:
        raise Rejected("empty file", "empty")
    if len(data) > settings.max_image_bytes:
        raise Rejected(
            f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}", "too_large"
        )
    im = _open(data, settings.max_image_pixels)
    try:
        im.load()  # decodes every byte: truncated or corrupt data fails here
    except Exception as e:
        raise Rejected(f"image data is truncated or corrupt: {e}", "corrupt") from e
    info = CheckedImage(data, hashlib.sha256(data).hexdigest(), str(im.format), im.width, im.height)
    return info, im


def check_image(data: bytes, settings: Settings) -> CheckedImage:
    """Validate bytes as a complete, supported image within the byte and pixel limits."""
    return _decode(data, settings)[0]


def decode_rgb(data: bytes, settings: Settings) -> Image.Image:
    """A checked image decoded to RGB (for inference)."""
    return _decode(data, settings)[1].convert("RGB")


@dataclass
class ArchiveMember:
    filename: str  # path inside the archive
    label: str | None  # the folder it is in (None: at the archive's root)
    data: bytes | None  # None when rejected
    error: Rejected | None = None


def _unsafe_name(name: str) -> bool:
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        return True
    return ".." in name.split("/")


def read_archive(f: BinaryIO, settings: Settings) -> list[ArchiveMember]:
    """Members of a .zip with one folder per class, checked for traversal and expansion limits.

    The whole archive is refused (Problem) when it is not a zip, holds an unsafe path, has too
    many files or would expand beyond `max_archive_expanded_bytes`; single members that are too
    big are returned as rejected. Files are read in memory and never extracted to disk.
    """
    raw = f.read(settings.max_archive_bytes + 1)
    if len(raw) > settings.max_archive_bytes:
        raise TooLarge(f"archive is larger than the limit of {settings.max_archive_bytes} bytes")
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as e:
        raise InvalidInput(f"archive is not a readable .zip file: {e}") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        bad = [i.filename for i in infos if _unsafe_name(i.filename)]
        if bad:
            raise InvalidInput(f"archive member path escapes the archive: {bad[0]!r}")
        infos = [i for i in infos if not _HIDDEN.search(i.filename)]
        if len(infos) > settings.max_archive_files:
            raise TooLarge(
                f"archive holds {len(infos)} files, over the limit of {settings.max_archive_files}"
            )
        expanded = sum(i.file_size for i in infos)
        limit = settings.max_archive_expanded_bytes
        if expanded > limit:
            raise TooLarge(f"archive expands to {expanded} bytes, over the limit of {limit}")
        return [_read_member(zf, info, settings) for info in infos]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings) -> ArchiveMember:
    parent = posixpath.dirname(info.filename)
    label = posixpath.basename(parent) if parent else None
    if info.file_size > settings.max_image_bytes:
        err = Rejected(
            f"image is {info.file_size} bytes, over the limit of {settings.max_image_bytes}", "too_large"
        )
        return ArchiveMember(info.filename, label, None, err)
    try:
        with zf.open(info) as member:
            # The declared size may lie: never read more than the limit.
            data = read_limited(member, settings.max_image_bytes)  # type: ignore[arg-type]
    except Rejected as e:
        return ArchiveMember(info.filename, label, None, e)
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as e:
        return ArchiveMember(
            info.filename, label, None, Rejected(f"cannot read archive member: {e}", "corrupt")
        )
    return ArchiveMember(info.filename, label, data)
