"""Hugging Face parquet files of images of any size: ImageNet-style classification (``image``
{bytes, path} + ``label``, the layout of ``ILSVRC/imagenet-1k``) and Pascal-VOC-style segmentation
(``image`` + a PNG ``mask`` column, 21 classes, 255 = ignore, kept as is).

Classification images are decoded to RGB and cut to ``size x size``: for training a random resized
crop (scale 0.08-1 of the area, aspect 3/4-4/3, drawn from ``seed`` and the row) and a random
horizontal flip, for evaluation a resize of the shorter side to ``size * 256 / 224`` and a center
crop. Segmentation pairs are resized (image bilinear, mask nearest, so 255 stays 255) so the shorter
side is ``size``, then center-cropped. A row that does not decode is answered with a one-line
ValueError naming the file and the row.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

IGNORE_LABEL = 255


def decode(blob: bytes | None, origin: str, row: int, mode: str) -> Image.Image:
    """Decode one encoded image (``mode`` "RGB" or "L"), or raise a one-line ValueError naming the row."""
    try:
        image = Image.open(io.BytesIO(blob or b""))
        image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises several kinds for a broken file
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{origin}: row {row}: image does not decode ({detail}); accepted is a JPEG or PNG") from None
    return image if image.mode == mode else image.convert(mode)


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop (scale 0.08-1, log-uniform aspect 3/4-4/3, ten tries, then the
    central crop of the clamped aspect), drawn from ``rng``, resized to ``size x size`` (bilinear)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    aspect = min(max(width / height, 3 / 4), 4 / 3)
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    x, y = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))


def resize_center_crop(image: Image.Image, size: int, shorter: int, resample: int = Image.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``shorter``, then cut the central ``size x size``."""
    width, height = image.size
    scale = shorter / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((w, h), resample)
    x, y = (w - size) // 2, (h - size) // 2
    return image.crop((x, y, x + size, y + size))


def read_classification(
    path: str | os.PathLike[str], size: int, *, train: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, size, size]`` and labels ``int64 [N]`` of an image-classification parquet
    file (crops as in the module docstring; row ``r``'s training crop and flip come from
    ``default_rng([seed, r])``)."""
    table = pq.read_table(Path(path), columns=["image", "label"])
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    out = np.empty((len(blobs), 3, size, size), dtype=np.uint8)
    for row, blob in enumerate(blobs):
        image = decode(blob, str(path), row, "RGB")
        if train:
            rng = np.random.default_rng([seed, row])
            image = random_resized_crop(image, size, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = resize_center_crop(image, size, round(size * 256 / 224))
        out[row] = np.asarray(image).transpose(2, 0, 1)
    return out, table.column("label").to_numpy().astype(np.int64)


def read_voc(path: str | os.PathLike[str], size: int, mask_column: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, size, size]`` and masks ``uint8 [N, size, size]`` (class ids, 255 =
    ignore) of a VOC-style parquet file.

    Raises
    ------
    ValueError
        If a row does not decode, its image and mask differ in size, or a mask holds a value that is
        neither a class 0..20 nor 255.
    """
    table = pq.read_table(Path(path), columns=["image", mask_column])
    images = table.column("image").combine_chunks().field("bytes").to_pylist()
    masks = table.column(mask_column).combine_chunks().field("bytes").to_pylist()
    out_images = np.empty((len(images), 3, size, size), dtype=np.uint8)
    out_masks = np.empty((len(images), size, size), dtype=np.uint8)
    for row, (image_blob, mask_blob) in enumerate(zip(images, masks, strict=True)):
        image = decode(image_blob, str(path), row, "RGB")
        mask_image = Image.open(io.BytesIO(mask_blob or b""))
        mask = decode(mask_blob, str(path), row, "P" if mask_image.mode == "P" else "L")
        if mask.size != image.size:
            raise ValueError(
                f"{path}: row {row}: mask is {mask.size[0]}x{mask.size[1]}, image {image.size[0]}x{image.size[1]}"
            )
        mask_array = np.asarray(resize_center_crop(mask, size, size, Image.NEAREST))
        bad = mask_array[(mask_array > 20) & (mask_array != IGNORE_LABEL)]
        if bad.size:
            raise ValueError(
                f"{path}: row {row}: mask value {int(bad[0])}; accepted are classes 0..20 and 255 (ignore)"
            )
        out_images[row] = np.asarray(resize_center_crop(image, size, size)).transpose(2, 0, 1)
        out_masks[row] = mask_array
    return out_images, out_masks
