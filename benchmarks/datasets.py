"""Data for the few-shot benchmark.

Three sources:
- a procedural "synthetic world" of coloured shapes with captions (pretraining data for the offline
  CLIP, and a style-shifted version of it as a few-shot task it was not trained on);
- scikit-learn's bundled digits (8x8 greyscale, upscaled), a real-image task pretraining never saw;
- the 11 datasets of the CoOp / CLIP-LoRA layout under a data root (real-data mode).

Every generator is deterministic for its seed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Synthetic world
# ----------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.15, 0.80),
    "orange": (1.00, 0.52, 0.05),
}
SIZES = {"small": (0.13, 0.19), "large": (0.27, 0.34)}  # radius as a fraction of the image side
POSITIONS = {
    "on the left": (0.30, 0.50),
    "on the right": (0.70, 0.50),
    "at the top": (0.50, 0.30),
    "at the bottom": (0.50, 0.70),
    "in the center": (0.50, 0.50),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
# Rendering is done at SUPERSAMPLE x the output size and box-filtered down (anti-aliasing).
SUPERSAMPLE = 2


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-radius shape; dx, dy: (H, W) offsets from the centre in radii."""
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82
    if shape == "triangle":  # pointing up, base at dy = 0.8
        return (dy <= 0.8) & (dy >= -0.95) & (np.abs(dx) <= (dy + 0.95) * 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 0.95)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 0.95))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= 1.0) & (d2 >= 0.42)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class Scene:
    """One object on a background; the attributes a caption can mention."""

    shape: str
    colour: str
    size: str
    position: str
    background: str


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        background=rng.choice(list(BACKGROUNDS)),
    )


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming shape and colour, and (randomly) size, position and background.

    Captions range from the bare "a photo of a red circle." (the few-shot prompt form) to
    "a photo of a small red circle on the left on a black background."
    """
    words = [scene.size] if rng.random() < 0.6 else []
    words += [scene.colour, scene.shape]
    text = "a photo of a " + " ".join(words)
    if rng.random() < 0.6:
        text += " " + scene.position
    if rng.random() < 0.4:
        text += f" on a {scene.background} background"
    return text + "."


def render(scene: Scene, size: int, rng: np.random.Generator, *, shifted: bool = False) -> np.ndarray:
    """Render a scene to float32 RGB (size, size, 3) in [0, 1].

    shifted=False: flat background, flat fill, mild noise (the pretraining style).
    shifted=True: the few-shot domain shift — textured backgrounds (smooth random colour waves),
    striped fills, stronger pixel noise and a colour cast.
    """
    s = size * SUPERSAMPLE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s  # (s, s) pixel coordinates in [0, 1)
    lo, hi = SIZES[scene.size]
    radius = rng.uniform(lo, hi)
    cx, cy = POSITIONS[scene.position]
    cx += rng.uniform(-0.05, 0.05)
    cy += rng.uniform(-0.05, 0.05)
    angle = rng.uniform(-0.25, 0.25)  # small rotation, radians
    ca, sa = np.cos(angle), np.sin(angle)
    dx = ((xx - cx) * ca + (yy - cy) * sa) / radius
    dy = (-(xx - cx) * sa + (yy - cy) * ca) / radius
    mask = _shape_mask(scene.shape, dx, dy)[..., None]  # (s, s, 1)

    colour = np.array(COLOURS[scene.colour], np.float32) * rng.uniform(0.85, 1.1)
    bg = np.array(BACKGROUNDS[scene.background], np.float32) + rng.uniform(-0.05, 0.05, 3)
    if not shifted:
        img = np.where(mask, colour, bg)
        noise = 0.03
    else:
        img = _shifted_style(scene, mask, colour, xx, yy, dx, dy, rng)
        noise = 0.10
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _shifted_style(scene, mask, colour, xx, yy, dx, dy, rng) -> np.ndarray:
    """Textured background + striped fill + colour cast; all arrays (s, s[, 3])."""
    # Background: smooth random colour field (sum of a few random sinusoids per channel).
    bg = np.zeros(xx.shape + (3,), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(-3, 3, 2)
            ph = rng.uniform(0, 2 * np.pi)
            bg[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    bg = 0.5 + 0.09 * bg
    # Fill: stripes alternating between the colour and a darker shade of it.
    freq = rng.uniform(4, 8)
    theta = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (dx * np.cos(theta) + dy * np.sin(theta))) > 0
    fill = np.where(stripes[..., None], colour, colour * 0.55)
    cast = rng.uniform(-0.08, 0.08, 3).astype(np.float32)  # global colour cast
    img = np.where(mask, fill, bg) + cast
    return img


def scene_image(scene: Scene, size: int, rng: np.random.Generator, *, shifted: bool = False) -> Image.Image:
    arr = render(scene, size, rng, shifted=shifted)
    return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")


def pretraining_batch(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n (image, caption) pairs from the unshifted world: images (n, size, size, 3) float32 in [0, 1]."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.float32)
    texts = []
    for i in range(n):
        scene = random_scene(rng)
        images[i] = render(scene, size, nrng)
        texts.append(caption(scene, rng))
    return images, texts


# ----------------------------------------------------------------------------------------------
# Few-shot tasks
# ----------------------------------------------------------------------------------------------


@dataclass
class FewShotTask:
    """A classification task: a pool to draw k-shot training sets from, and a fixed test split."""

    name: str
    classes: list[str]
    train_images: list[Image.Image]
    train_labels: list[int]
    test_images: list[Image.Image]
    test_labels: list[int]
    template: str = "a photo of a {}."
    published: dict[str, dict[str, float]] = field(default_factory=dict)

    def sample(self, shots: int, seed: int) -> tuple[list[Image.Image], list[int]]:
        """shots images per class from the training pool (fewer where a class has fewer), by seed."""
        return few_shot_sample(self.train_images, self.train_labels, len(self.classes), shots, seed)


def few_shot_sample(images: list, labels: list[int], n_classes: int, shots: int, seed: int):
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {c: [] for c in range(n_classes)}
    for i, y in enumerate(labels):
        by_class[y].append(i)
    picked: list[int] = []
    for c in range(n_classes):
        idx = by_class[c]
        picked += rng.sample(idx, min(shots, len(idx)))
    return [images[i] for i in picked], [labels[i] for i in picked]


def shifted_shapes_task(
    size: int, *, n_train_per_class: int = 16, n_test_per_class: int = 12, seed: int = 1234
) -> FewShotTask:
    """Shape x colour classes ("red circle", ...) rendered in the shifted style."""
    classes = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    split: dict[str, tuple[list[Image.Image], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        colour, shape = name.split(" ")
        for part, count in (("train", n_train_per_class), ("test", n_test_per_class)):
            for _ in range(count):
                scene = Scene(
                    shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), "gray"
                )
                split[part][0].append(scene_image(scene, size, nrng, shifted=True))
                split[part][1].append(label)
    return FewShotTask("shifted_shapes", classes, *split["train"], *split["test"])


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_task(size: int, *, n_test_per_class: int = 40, seed: int = 0) -> FewShotTask:
    """sklearn's bundled 8x8 digits, upscaled to size x size RGB, classes "zero".."nine"."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = random.Random(seed)
    order = list(range(len(data.target)))
    rng.shuffle(order)
    seen: dict[int, int] = {}
    train_i, test_i = [], []
    for i in order:
        y = int(data.target[i])
        seen[y] = seen.get(y, 0) + 1
        (test_i if seen[y] <= n_test_per_class else train_i).append(i)

    def to_pil(i: int) -> Image.Image:
        arr = (data.images[i] / 16.0 * 255.0).astype(np.uint8)  # (8, 8) ink intensity
        img = Image.fromarray(255 - arr, "L").resize((size, size), Image.BILINEAR)  # dark ink on white
        return img.convert("RGB")

    return FewShotTask(
        "digits",
        list(DIGIT_NAMES),
        [to_pil(i) for i in train_i],
        [int(data.target[i]) for i in train_i],
        [to_pil(i) for i in test_i],
        [int(data.target[i]) for i in test_i],
    )


# ----------------------------------------------------------------------------------------------
# Real data: the CoOp / CLIP-LoRA layout
# ----------------------------------------------------------------------------------------------


@dataclass
class RealDataset:
    """Where one dataset lives under the data root and how it is prompted (CoOp's templates)."""

    folder: str  # directory under the data root
    image_dir: str  # image directory, relative to folder
    split: str  # split file, relative to folder ("split_zhou_*.json"; special loaders below)
    template: str


REAL_DATASETS: dict[str, RealDataset] = {
    "imagenet": RealDataset("imagenet", "images", "classnames.txt", "a photo of a {}."),
    "sun397": RealDataset("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "fgvc_aircraft": RealDataset("fgvc_aircraft", "data/images", "data/variants.txt",
                                 "a photo of a {}, a type of aircraft."),
    "eurosat": RealDataset("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "stanford_cars": RealDataset("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "food101": RealDataset("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "oxford_pets": RealDataset("oxford_pets", "images", "split_zhou_OxfordPets.json",
                               "a photo of a {}, a type of pet."),
    "oxford_flowers": RealDataset("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                                  "a photo of a {}, a type of flower."),
    "caltech101": RealDataset("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                              "a photo of a {}."),
    "dtd": RealDataset("dtd", "dtd/images", "split_zhou_DescribableTextures.json", "{} texture."),
    "ucf101": RealDataset("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                          "a photo of a person doing {}."),
}


class LazyImage:
    """An image file opened (as RGB) only when used; quacks like the PIL image it loads."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Image.Image:
        with Image.open(self.path) as im:
            return im.convert("RGB")


class LazyImages(list):
    """A list of image paths whose items are loaded on access (keeps big test splits off memory)."""

    def __getitem__(self, i):  # type: ignore[override]
        item = super().__getitem__(i)
        if isinstance(i, slice):
            return [LazyImage(p).load() for p in item]
        return LazyImage(item).load()

    def __iter__(self):
        for p in super().__iter__():
            yield LazyImage(p).load()


# (image path, label, class name) triples of each split
Split = list[tuple[str, int, str]]


def _split_zhou(root: Path, spec: RealDataset) -> dict[str, Split]:
    """CoOp's split_zhou_*.json: {"train"|"val"|"test": [[relative path, label, class name], ...]}."""
    data = json.loads((root / spec.folder / spec.split).read_text())
    img_root = root / spec.folder / spec.image_dir
    return {part: [(str(img_root / p), int(y), str(c)) for p, y, c in data[part]]
            for part in ("train", "test")}


def _aircraft(root: Path, spec: RealDataset) -> dict[str, Split]:
    """FGVC-Aircraft: data/variants.txt (class names), data/images_variant_{train,test}.txt
    ("<image id> <variant name>" lines), images in data/images/<id>.jpg."""
    base = root / spec.folder / "data"
    classes = [ln.strip() for ln in (base / "variants.txt").read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, Split] = {}
    for part in ("train", "test"):
        items: Split = []
        for ln in (base / f"images_variant_{part}.txt").read_text().splitlines():
            if ln.strip():
                img, name = ln.strip().split(" ", 1)
                items.append((str(base / "images" / f"{img}.jpg"), index[name], name))
        out[part] = items
    return out


def _imagenet(root: Path, spec: RealDataset) -> dict[str, Split]:
    """ImageNet: classnames.txt ("<wnid> <class name>" lines), images/{train,val}/<wnid>/*; test = val."""
    base = root / spec.folder
    lines = (base / "classnames.txt").read_text().splitlines()
    rows = [ln.strip().split(" ", 1) for ln in lines if ln.strip()]
    out: dict[str, Split] = {}
    for part, folder in (("train", "train"), ("test", "val")):
        items: Split = []
        for label, (wnid, name) in enumerate(rows):
            d = base / spec.image_dir / folder / wnid
            items += [(str(d / f), label, name) for f in sorted(os.listdir(d))]
        out[part] = items
    return out


def load_real_task(root: Path, name: str) -> FewShotTask:
    spec = REAL_DATASETS[name]
    loader = {"imagenet": _imagenet, "fgvc_aircraft": _aircraft}.get(name, _split_zhou)
    splits = loader(Path(root), spec)
    n_classes = 1 + max(y for _, y, _ in splits["train"] + splits["test"])
    classes = [""] * n_classes
    for _, y, c in splits["train"] + splits["test"]:
        classes[y] = classes[y] or c.replace("_", " ")
    train, test = splits["train"], splits["test"]
    return FewShotTask(
        name, classes,
        LazyImages(p for p, _, _ in train), [y for _, y, _ in train],
        LazyImages(p for p, _, _ in test), [y for _, y, _ in test],
        template=spec.template,
    )


def load_real_tasks(root: Path, names: list[str] | None = None) -> list[FewShotTask]:
    """The named datasets (default: every one whose folder exists under root)."""
    if names:
        unknown = [n for n in names if n not in REAL_DATASETS]
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; known: {', '.join(REAL_DATASETS)}")
    else:
        names = [n for n, s in REAL_DATASETS.items() if (Path(root) / s.folder).is_dir()]
        if not names:
            raise ValueError(f"no dataset folders under {root} (expected some of "
                             f"{', '.join(s.folder for s in REAL_DATASETS.values())})")
    return [load_real_task(Path(root), n) for n in names]
