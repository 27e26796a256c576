"""Hugging Face parquet files of images of any size: ImageNet-style classification (``image``
{bytes, path} + ``label``, the layout of ``ILSVRC/imagenet-1k``) and Pascal-VOC-style segmentation
(``image`` + a PNG ``mask`` column, 21 classes, 255 = ignore, kept as is).

Classification images are decoded to RGB and cut to ``size x size``: for training a random resized
crop (scale 0.08-1 of the area, aspect 3/4-4/3, drawn from ``seed`` and the row) and a random
horizontal flip, for evaluation a resize of the shorter side to ``size * 256 / 224`` and a center
crop. Segmentation pairs are resized (image bilinear, mask nearest, so 255 stays 255) so the shorter
side is ``size``, then center-cropped. A row that does not decode is answered with a one-line
ValueError naming the file and the row.

A split may be one file or several shards: :func:`shard_labels`, :func:`mask_labels` and
:func:`take_rows` number its rows across the shards in the order given, and read (and decode) only
what they return, streaming each shard :data:`PARQUET_BATCH_ROWS` rows at a time.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IGNORE_LABEL = 255
VOC_CLASSES = 21  # background 0 and 20 object classes
# Rows decoded at a time when a client reads its rows of a split: the reader holds one batch of
# encoded images, not the whole split (reading CIFAR-10's train split whole costs ~180 MB of RSS).
PARQUET_BATCH_ROWS = 1024


# Pixels an image of a data set of any size (ImageNet, VOC) may hold, as a multiple of the pixels of the
# size it is cut to: 1024 x 224 x 224 = 51 million for ImageNet. A larger one (a decompression bomb: a
# few KB of PNG for 20000 x 20000 pixels) is refused from its header, before any pixel is decoded.
MAX_PIXELS_PER_CUT_PIXEL = 1024


def max_pixels(size: int) -> int:
    """The most pixels an image cut to ``size x size`` may hold (:data:`MAX_PIXELS_PER_CUT_PIXEL`)."""
    return MAX_PIXELS_PER_CUT_PIXEL * size * size


DEFAULT_MAX_PIXELS = max_pixels(224)  # where the size an image is cut to is not known (a mask's class)


def _image_error(origin: str, row: int | None, problem: str) -> ValueError:
    if row is None:  # an image file of its own (an ImageFolder's)
        return ValueError(f"{origin}: {problem}; accepted is an image file Pillow reads")
    return ValueError(f"{origin}: row {row}: {problem}; accepted is a JPEG or PNG")


def open_image(blob: bytes | None, origin: str, row: int | None, pixels: int) -> Image.Image:
    """The header of one encoded image (no pixel decoded yet), or a one-line ValueError naming the file
    and row (``row`` None: a file of one image): a null image, bytes that are no image, or one of more
    than ``pixels`` pixels."""
    if blob is None:
        raise _image_error(origin, row, "the image is null")
    try:
        image = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as error:  # beyond twice Pillow's own bound: it names no size
        raise _image_error(origin, row, f"image is more than {pixels:,} pixels ({str(error)[:60]})") from None
    except Exception as error:  # noqa: BLE001 - PIL raises several kinds for a broken file
        detail = " ".join(str(error).split()) or type(error).__name__
        raise _image_error(origin, row, f"image does not decode ({detail[:120]})") from None
    if image.width * image.height > pixels:
        raise _image_error(origin, row, f"image is more than {pixels:,} pixels ({image.width}x{image.height})")
    return image


def decode(
    blob: bytes | None, origin: str, row: int | None, mode: str, pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode one encoded image (``mode`` "RGB" or "L") of at most ``pixels`` pixels, or raise a one-line
    ValueError naming the file and row (:func:`open_image`)."""
    image = open_image(blob, origin, row, pixels)
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises several kinds for a broken file
        detail = " ".join(str(error).split()) or type(error).__name__
        raise _image_error(origin, row, f"image does not decode ({detail[:120]})") from None
    return image if image.mode == mode else image.convert(mode)


def check_headers(path: Path, column: str, pixels: int, size: tuple[int, int] | None = None) -> None:
    """Open the header of every image in ``column`` of the parquet file ``path`` (no pixel decoded,
    about 30 µs an image), refusing as :func:`open_image` does, and, with ``size`` (width, height),
    an image of another size; cached per file and modification time."""
    _check_headers(*stamped(path), column, pixels, size)


@functools.lru_cache(maxsize=16)
def _check_headers(path: str, mtime_ns: int, column: str, pixels: int, size: tuple[int, int] | None) -> None:
    row = 0
    for batch in pq.ParquetFile(path, memory_map=True).iter_batches(PARQUET_BATCH_ROWS, columns=[column]):
        for blob in batch.column(0).field("bytes").to_pylist():
            image = open_image(blob, path, row, pixels)
            if size is not None and image.size != size:
                raise ValueError(
                    f"{path}: row {row}: image is {image.width}x{image.height}, expected {size[0]}x{size[1]}"
                )
            row += 1


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


def classification_image(
    blob: bytes | None, origin: str, row: int, size: int, *, train: bool, seed: int, epoch: int | None = None
) -> np.ndarray:
    """One classification image ``uint8 [3, size, size]``: for training the crop and flip drawn from
    ``default_rng([seed, row])``, so a row is cut the same whichever other rows are read with it
    (``default_rng([seed, epoch, row])`` with ``epoch``: a fresh cut every epoch, as a stream draws it)."""
    image = decode(blob, origin, row, "RGB", max_pixels(size))
    if train:
        rng = np.random.default_rng([seed, row] if epoch is None else [seed, epoch, row])
        image = random_resized_crop(image, size, rng)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        image = resize_center_crop(image, size, round(size * 256 / 224))
    return np.asarray(image).transpose(2, 0, 1)


def _mask(blob: bytes | None, origin: str, row: int, pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A VOC mask (palette PNG: the indices are the class ids), as decoded, without converting colours."""
    mode = "P" if _peek_mode(blob) == "P" else "L"
    return decode(blob, origin, row, mode, pixels)


def _peek_mode(blob: bytes | None) -> str:
    try:
        return Image.open(io.BytesIO(blob or b"")).mode
    except Exception:  # noqa: BLE001 - decode() reports the broken row
        return "L"


def _check_mask(mask: np.ndarray, origin: str, row: int) -> None:
    bad = mask[(mask >= VOC_CLASSES) & (mask != IGNORE_LABEL)]
    if bad.size:
        raise ValueError(
            f"{origin}: row {row}: mask value {int(bad[0])}; accepted are classes 0..{VOC_CLASSES - 1} and 255 (ignore)"
        )


def voc_pair(
    image_blob: bytes | None, mask_blob: bytes | None, origin: str, row: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One VOC pair: image ``uint8 [3, size, size]`` and mask ``uint8 [size, size]`` (module docstring)."""
    image = decode(image_blob, origin, row, "RGB", max_pixels(size))
    mask = _mask(mask_blob, origin, row, max_pixels(size))
    if mask.size != image.size:
        raise ValueError(
            f"{origin}: row {row}: mask is {mask.size[0]}x{mask.size[1]}, image {image.size[0]}x{image.size[1]}"
        )
    mask_array = np.asarray(resize_center_crop(mask, size, size, Image.NEAREST))
    _check_mask(mask_array, origin, row)
    return np.asarray(resize_center_crop(image, size, size)).transpose(2, 0, 1), mask_array


def mask_label(mask: np.ndarray) -> int:
    """The class a segmentation image stands for when partitioning: the most frequent object class
    (1..20) of its mask, the smallest on a tie, else 0 (background and ignore only)."""
    counts = np.bincount(mask.reshape(-1), minlength=256)[1:VOC_CLASSES]
    return int(counts.argmax()) + 1 if counts.any() else 0


def read_classification(
    path: str | os.PathLike[str], size: int, *, train: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3, size, size]`` and labels ``int64 [N]`` of an image-classification parquet
    file (crops as in :func:`classification_image`)."""
    table = pq.read_table(Path(path), columns=["image", "label"])
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    out = np.empty((len(blobs), 3, size, size), dtype=np.uint8)
    for row, blob in enumerate(blobs):
        out[row] = classification_image(blob, str(path), row, size, train=train, seed=seed)
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
        out_images[row], out_masks[row] = voc_pair(image_blob, mask_blob, str(path), row, size)
    return out_images, out_masks


# --------------------------------------------------------------------------------------------------
# Splits of one or more shards
# --------------------------------------------------------------------------------------------------


def take_parquet_rows(parquet: pq.ParquetFile, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """``rows`` of ``columns`` of an opened file, in the order given, streaming it
    :data:`PARQUET_BATCH_ROWS` rows at a time."""
    order = np.argsort(rows, kind="stable")
    ascending = rows[order]
    taken, start = [], 0
    for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=list(columns), use_threads=False):
        low, high = np.searchsorted(ascending, [start, start + batch.num_rows])
        if high > low:
            taken.append(batch.take(pa.array(ascending[low:high] - start, type=pa.int64())))
        start += batch.num_rows
    schema = pa.schema([parquet.schema_arrow.field(c) for c in columns])
    table = pa.Table.from_batches(taken, schema=schema)
    return table.take(pa.array(np.argsort(order, kind="stable"), type=pa.int64()))


def _open(path: Path, columns: Sequence[str], label: str = "label") -> pq.ParquetFile:
    """A shard, opened (memory-mapped) after checking it has ``columns``: encoded images as struct
    {bytes, path}, the ``label`` column an integer."""
    accepted = ", ".join(f"{c}: int64" if c == label else f"{c}: struct<bytes: binary, path: string>" for c in columns)
    try:
        parquet = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}); expected {accepted}") from exc
    schema = parquet.schema_arrow
    for column in columns:
        kind = schema.field(column).type if column in schema.names else None
        fine = kind is not None and (
            pa.types.is_integer(kind)
            if column == label
            else pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
        )
        if not fine:
            raise ValueError(f"{path}: column {column} is {kind or 'missing'}; expected columns {accepted}")
    return parquet


def stamped(path: Path) -> tuple[str, int]:
    """``(path, modification time)``: a cache key under which a rewritten file is read again."""
    return str(path), path.stat().st_mtime_ns


def _cache_key(paths: Sequence[Path]) -> tuple[tuple[str, int], ...]:
    return tuple(stamped(p) for p in paths)


def shard_labels(paths: Sequence[Path], label: str = "label") -> np.ndarray:
    """The ``label`` column of every shard, concatenated (read-only; cached per files and mtimes)."""
    return _shard_labels(_cache_key(paths), label)


@functools.lru_cache(maxsize=8)
def _shard_labels(key: tuple[tuple[str, int], ...], label: str) -> np.ndarray:
    parts = [_open(Path(p), [label], label).read(columns=[label]).column(label).to_numpy() for p, _ in key]
    labels = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
    labels.flags.writeable = False
    return labels


def mask_labels(paths: Sequence[Path], mask_column: str = "mask") -> np.ndarray:
    """One class per row for partitioning (:func:`mask_label`), from the masks alone (no image is
    decoded); read-only, cached per files and mtimes."""
    return _mask_labels(_cache_key(paths), mask_column)


@functools.lru_cache(maxsize=8)
def _mask_labels(key: tuple[tuple[str, int], ...], mask_column: str) -> np.ndarray:
    labels: list[int] = []
    for path, _ in key:
        for batch in _open(Path(path), [mask_column]).iter_batches(PARQUET_BATCH_ROWS, columns=[mask_column]):
            for blob in batch.column(0).field("bytes").to_pylist():
                row = len(labels)
                mask = np.asarray(_mask(blob, path, row))
                _check_mask(mask, path, row)
                labels.append(mask_label(mask))
    out = np.asarray(labels, dtype=np.int64)
    out.flags.writeable = False
    return out


def take_rows(
    paths: Sequence[Path], rows: np.ndarray, columns: Sequence[str], label: str = "label"
) -> list[tuple[Path, pa.Table, np.ndarray]]:
    """Rows ``rows`` (numbered across the shards in order) of ``columns`` (``label`` the integer one):
    per shard holding some, the shard, the table of its selected rows and where each of those rows
    goes in the output."""
    sizes = [_open(p, columns, label).metadata.num_rows for p in paths]
    ends = np.cumsum(sizes)
    shard = np.searchsorted(ends, rows, side="right")
    taken = []
    for i, path in enumerate(paths):
        mine = np.flatnonzero(shard == i)
        if mine.size:
            table = take_parquet_rows(_open(path, columns, label), rows[mine] - (ends[i] - sizes[i]), columns)
            taken.append((path, table, mine))
    return taken


def stream_rows(paths: Sequence[Path], rows: np.ndarray, columns: Sequence[str]) -> Iterator[tuple[Path, int, list]]:
    """Rows ``rows`` (ascending, numbered across the shards in order) of ``columns``, one at a time:
    ``(shard, row, [value per column])``, reading only the row groups that hold some of them, one
    row group at a time (an image column as its encoded bytes)."""
    start = 0
    for path in paths:
        parquet = _open(path, columns)
        for group in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            low, high = np.searchsorted(rows, [start, start + size])
            if high > low:
                table = parquet.read_row_group(group, columns=list(columns), use_threads=False)
                local = pa.array(rows[low:high] - start, type=pa.int64())
                values = [_plain(table.column(c).take(local)) for c in columns]
                for i, row in enumerate(rows[low:high]):
                    yield path, int(row), [v[i] for v in values]
            start += size


def _plain(column: pa.ChunkedArray) -> list:
    """A column's values as Python objects: an encoded image's bytes, a label's int."""
    array = column.combine_chunks()
    return array.field("bytes").to_pylist() if pa.types.is_struct(array.type) else array.to_pylist()


def take_classification(
    paths: Sequence[Path], rows: np.ndarray, size: int, *, train: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` of a classification split, decoded: images ``uint8 [n, 3, size, size]`` (row ``r``'s
    training crop from ``default_rng([seed, r])``, ``r`` its number in the split), labels ``int64 [n]``."""
    images = np.empty((rows.size, 3, size, size), dtype=np.uint8)
    labels = np.empty(rows.size, dtype=np.int64)
    for path, table, where in take_rows(paths, rows, ["image", "label"]):
        blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
        for out, blob in zip(where, blobs, strict=True):
            images[out] = classification_image(blob, str(path), int(rows[out]), size, train=train, seed=seed)
        labels[where] = table.column("label").to_numpy()
    return images, labels


def take_voc(
    paths: Sequence[Path], rows: np.ndarray, size: int, mask_column: str = "mask"
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` of a VOC split, decoded: images ``uint8 [n, 3, size, size]``, masks ``uint8 [n, size, size]``."""
    images = np.empty((rows.size, 3, size, size), dtype=np.uint8)
    masks = np.empty((rows.size, size, size), dtype=np.uint8)
    for path, table, where in take_rows(paths, rows, ["image", mask_column]):
        image_blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
        mask_blobs = table.column(mask_column).combine_chunks().field("bytes").to_pylist()
        for out, image_blob, mask_blob in zip(where, image_blobs, mask_blobs, strict=True):
            images[out], masks[out] = voc_pair(image_blob, mask_blob, str(path), int(rows[out]), size)
    return images, masks
