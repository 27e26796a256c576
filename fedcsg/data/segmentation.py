"""``fashion-mnist-seg``: a derived segmentation set built deterministically from a seed out of
Fashion-MNIST images (a benchmark of fedcsg's own, not Pascal VOC).

Each canvas (``canvas x canvas``, black) receives ``items`` Fashion-MNIST images pasted at seeded
positions, later items on top. An item covers the pixels where its image is non-zero; the mask
labels each covered pixel with the class + 1 of the topmost item covering it, and every other pixel
0 (background): 11 classes, exact masks, no ignore label.

This module builds canvases from images it is given; :mod:`fedcsg.data.readers` reads the
Fashion-MNIST images and builds the registry's set from them (``registry_set``, ``fashion_mnist_seg``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANVAS, ITEMS = 56, 3  # the registry's setting: three 28x28 items on a 56x56 canvas
SEG_CLASSES = 11  # background + the ten Fashion-MNIST classes
DERIVED_ROWS = {"train": 6000, "test": 1000}  # canvases of the registry's fashion-mnist-seg, seed 0


@dataclass(frozen=True)
class PastedSet:
    """Canvases ``uint8 [N, H, W]``, masks ``uint8 [N, H, W]`` and, per canvas and item, the source
    row, its class and the top-left corner ``(y, x)`` where it was pasted (``int64 [N, items, 4]``)."""

    images: np.ndarray
    masks: np.ndarray
    placements: np.ndarray


def paste_items(
    images: np.ndarray, labels: np.ndarray, count: int, seed: int, canvas: int = CANVAS, items: int = ITEMS
) -> PastedSet:
    """Build ``count`` canvases from ``images`` (``uint8 [M, h, w]``) and ``labels`` (``[M]``, 0..9).

    The generator ``numpy.random.default_rng(seed)`` draws, per canvas, ``items`` source rows and
    corners uniformly, so the same inputs and seed give the same set.

    Raises
    ------
    ValueError
        If the items do not fit the canvas or ``count`` / ``items`` is not positive.
    """
    num, height, width = images.shape
    if count <= 0 or items <= 0:
        raise ValueError(f"count = {count} and items = {items} are not accepted: positive integers are")
    if height > canvas or width > canvas:
        raise ValueError(f"canvas = {canvas} is not accepted: the items are {height}x{width}; at least that is")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, num, size=(count, items))
    ys = rng.integers(0, canvas - height + 1, size=(count, items))
    xs = rng.integers(0, canvas - width + 1, size=(count, items))
    out = np.zeros((count, canvas, canvas), dtype=np.uint8)
    masks = np.zeros((count, canvas, canvas), dtype=np.uint8)
    for n in range(count):
        for i in range(items):
            item = images[rows[n, i]]
            y, x = ys[n, i], xs[n, i]
            covered = item > 0
            window = out[n, y : y + height, x : x + width]
            window[covered] = item[covered]
            masks[n, y : y + height, x : x + width][covered] = labels[rows[n, i]] + 1
    placements = np.stack([rows, labels[rows], ys, xs], axis=-1).astype(np.int64)
    return PastedSet(out, masks, placements)


def split_seed(seed: int, split: str) -> int:
    """The seed of ``split``'s canvases in a set seeded by ``seed``: train ``seed``, test ``seed + 1``
    (train items make train canvases, test items test canvases)."""
    return seed + (split == "test")


def canvas_labels(pasted: PastedSet) -> np.ndarray:
    """One class per canvas for partitioning: its topmost item's class (0..9)."""
    return pasted.placements[:, -1, 1].copy()
