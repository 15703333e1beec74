"""Checking uploaded images and archives against the service's input limits."""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import unicodedata
import warnings
import zipfile
from collections.abc import Iterator
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


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# Our own check after the header is read replaces Pillow's warning (see _open).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

MAX_ASPECT = 8  # reduced images keep at most this ratio of long to short side (centre kept)


_PILLOW_DEFAULT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def set_pillow_limit(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to our setting when it is higher (Pillow's
    default, 89.5 M, would otherwise cap it). A lower setting is enforced by `_open` on the header;
    Pillow keeps its default for the code that opens images without us (thumbnails of stored files).
    """
    Image.MAX_IMAGE_PIXELS = max(max_pixels, _PILLOW_DEFAULT_PIXELS)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only: nothing is decoded yet) and check the pixel count and the format."""
    set_pillow_limit(max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        found = _BOMB_PIXELS.search(str(e))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise Rejected(f"image has {size}, over the limit of {max_pixels}", "too_many_pixels") from e
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


def _check_bytes(data: bytes, settings: Settings) -> None:
    if not data:
        raise Rejected("empty file", "empty")
    if len(data) > settings.max_image_bytes:
        raise Rejected(
            f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}", "too_large"
        )


def _load(im: Image.Image) -> None:
    try:
        im.load()  # decodes every byte: truncated or corrupt data fails here
    except Exception as e:
        raise Rejected(f"image data is truncated or corrupt: {e}", "corrupt") from e


def check_image(data: bytes, settings: Settings, sha256: str | None = None) -> CheckedImage:
    """Validate bytes as a complete, supported image within the byte and pixel limits.

    The pixels are decoded (to find truncated data) and dropped at once: one image at a time.
    """
    _check_bytes(data, settings)
    with _open(data, settings.max_image_pixels) as im:
        fmt, width, height = str(im.format), im.width, im.height
        _load(im)
    return CheckedImage(data, sha256 or hashlib.sha256(data).hexdigest(), fmt, width, height)


def reduce(im: Image.Image, side: int) -> Image.Image:
    """`im` scaled down so its shorter side is `side` (never up), long side cut to MAX_ASPECT x.

    CLIP preprocessing resizes the shorter side to the input size anyway; holding more is waste.
    """
    w, h = im.size
    short = min(w, h)
    if max(w, h) > MAX_ASPECT * short:  # keep the centre of extreme panoramas / strips
        cw, ch = min(w, MAX_ASPECT * short), min(h, MAX_ASPECT * short)
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        w, h = im.size
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")  # palettes resample badly
    if short > side:
        scale = side / short
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC,
                       reducing_gap=2.0)
    return im


def decode_rgb(data: bytes, settings: Settings, side: int | None = None) -> Image.Image:
    """A checked image decoded to RGB, reduced to `side` (default `settings.image_decode_side`).

    JPEG decodes straight at a reduced scale (draft mode); other formats decode once, are reduced,
    and the full-size pixels are dropped before the next image is read.
    """
    _check_bytes(data, settings)
    return _reduced_rgb(_open(data, settings.max_image_pixels), side or settings.image_decode_side)


def decode_stored(data: bytes, side: int, max_pixels: int) -> Image.Image:
    """An image that was checked when it was stored, decoded to RGB at `side` (training)."""
    return _reduced_rgb(_open(data, max_pixels), side)


def _reduced_rgb(im: Image.Image, side: int) -> Image.Image:
    if im.format == "JPEG":
        im.draft("RGB", (side, side))  # smallest DCT scale that keeps both sides >= side
    _load(im)
    small = reduce(im, side)
    if small is not im:
        im.close()
    return small if small.mode == "RGB" else small.convert("RGB")


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


def _size(f: BinaryIO) -> int:
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    return size


def read_archive(f: BinaryIO, settings: Settings) -> Iterator[ArchiveMember]:
    """Members of a .zip with one folder per class, checked for traversal and expansion limits.

    The whole archive is refused (Problem) when it is not a zip, holds an unsafe path, no file, too
    many files or would expand beyond `max_archive_expanded_bytes` - all found from the central
    directory, before any member is read. Members are then read one at a time as the iterator is
    consumed (never all at once, never extracted to disk); single members that are too big are
    returned as rejected. `f` must be seekable (an uploaded file is spooled to disk).
    """
    if _size(f) > settings.max_archive_bytes:
        raise TooLarge(f"archive is larger than the limit of {settings.max_archive_bytes} bytes")
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as e:
        raise InvalidInput(f"archive is not a readable .zip file: {e}") from e
    infos = [i for i in zf.infolist() if not i.is_dir()]
    bad = [i.filename for i in infos if _unsafe_name(i.filename)]
    if bad:
        raise InvalidInput(f"archive member path escapes the archive: {bad[0][:200]!r}")
    infos = [i for i in infos if not _HIDDEN.search(i.filename)]
    if not infos:
        raise InvalidInput("archive holds no files: put images in one folder per class")
    if len(infos) > settings.max_archive_files:
        raise TooLarge(f"archive holds {len(infos)} files, over the limit of {settings.max_archive_files}")
    expanded = sum(i.file_size for i in infos)
    limit = settings.max_archive_expanded_bytes
    if expanded > limit:
        raise TooLarge(f"archive expands to {expanded} bytes, over the limit of {limit}")
    return _members(zf, infos, settings)


def _members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], settings: Settings
) -> Iterator[ArchiveMember]:
    with zf:
        for info in infos:
            yield _read_member(zf, info, settings)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings) -> ArchiveMember:
    parent = posixpath.dirname(info.filename)
    label = unicodedata.normalize("NFC", posixpath.basename(parent)) if parent else None
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
