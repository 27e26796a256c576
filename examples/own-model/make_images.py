"""Write a small image-classification folder in torchvision's ImageFolder layout: circles, squares and
triangles on noisy backgrounds, as PNG and JPEG files of several sizes.

    python make_images.py images            # images/train/{circle,square,triangle}/*, images/test/...

Stands in for your own folder of images: fedcsg reads any folder of this layout (``dataset =
"imagefolder"``, ``data-dir`` the folder), whatever the formats and sizes of its images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def shape_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """One image of ``kind``: a random size from 24 to 64 pixels a side, a noisy background and the
    shape in a random colour, place and size."""
    width, height = (int(v) for v in rng.integers(24, 65, size=2))
    background = rng.integers(0, 96, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    side = int(rng.integers(min(width, height) // 2, min(width, height) - 2))
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    colour = tuple(int(v) for v in rng.integers(128, 256, size=3))
    if kind == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    elif kind == "square":
        draw.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=colour)
    return image


def write_shapes(root: str | Path, train_per_class: int = 60, test_per_class: int = 20, seed: int = 0) -> Path:
    """Write ``root/{train,test}/CLASS/NNN.{png,jpg}`` (the formats alternate) and return ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in CLASSES:
            folder = Path(root) / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape_image(kind, rng).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the folder to write")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    args = parser.parse_args()
    print(write_shapes(args.root, args.train_per_class, args.test_per_class))
