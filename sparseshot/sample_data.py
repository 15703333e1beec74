"""A small sample image dataset, drawn by this project's own code (no third-party content).

    python -m sparseshot.sample_data OUT_DIR [--per-class 6] [--queries 2] [--seed 0] [--zip]

writes OUT_DIR/train/<class>/*.png (one folder per class, the upload layout), OUT_DIR/query/*.png
(held-out images named after their class) and, with --zip, OUT_DIR/train.zip. Classes are coloured
shapes ("red circle", "green square", "blue triangle") of random size and position on a noisy light
background; the same seed gives the same bytes. Licence: made by the SparseShot project, under the
project's own licence; free to use for trying the service.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = {"red circle": ((210, 30, 30), "circle"), "green square": ((30, 170, 40), "square"),
           "blue triangle": ((30, 50, 210), "triangle")}
SIZE = 64


def render(cls: str, rng: random.Random) -> bytes:
    """One SIZE x SIZE PNG of class `cls`."""
    color, shape = CLASSES[cls]
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(60):  # speckle noise, so images differ beyond the shape
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        draw.point((x, y), fill=tuple(rng.randint(150, 255) for _ in range(3)))
    r = rng.randint(12, 24)
    cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in color)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def generate(out: str | Path, per_class: int = 6, queries: int = 2, seed: int = 0,
             make_zip: bool = False) -> Path:
    """Write the dataset under `out` (see module doc); returns `out`."""
    out = Path(out)
    rng = random.Random(seed)
    for cls in CLASSES:
        folder = out / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"{cls.replace(' ', '_')}_{i:02d}.png").write_bytes(render(cls, rng))
    (out / "query").mkdir(parents=True, exist_ok=True)
    for cls in CLASSES:
        for i in range(queries):
            (out / "query" / f"{cls.replace(' ', '_')}_q{i}.png").write_bytes(render(cls, rng))
    if make_zip:
        with zipfile.ZipFile(out / "train.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted((out / "train").rglob("*.png")):
                zf.write(f, f.relative_to(out / "train").as_posix())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparseshot.sample_data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zip", action="store_true", help="also write OUT/train.zip")
    a = p.parse_args(argv)
    generate(a.out, a.per_class, a.queries, a.seed, a.zip)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
