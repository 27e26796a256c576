"""Reading a split: labels alone (:func:`load_labels`), or decoded images of selected rows
(:func:`load_split`). What reads a source is chosen by the source's kind (:class:`DataSource`):
one labels reader and one rows reader per kind (:data:`LABEL_READERS`, :data:`ROW_READERS`)."""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fedcsg.data import folders, hf_parquet, registry
from fedcsg.data.folders import FolderSettings
from fedcsg.data.hf_parquet import PARQUET_BATCH_ROWS as PARQUET_BATCH_ROWS  # re-exported
from fedcsg.data.hf_parquet import stamped, take_parquet_rows
from fedcsg.data.registry import (
    FOLDER_SETS,
    DatasetSpec,
    DataSource,
    Split,
    check_split,
    resolve_source,
    sized_spec,
)
from fedcsg.data.segmentation import DERIVED_ROWS, PastedSet, canvas_labels, paste_items, split_seed


def _parquet_schema_error(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{path}: {detail}; expected parquet columns img: struct<bytes: binary, path: string>, label: int64"
    )


def _check_parquet_schema(path: Path, schema: pa.Schema) -> None:
    names = schema.names
    if "img" not in names or "label" not in names:
        raise _parquet_schema_error(path, f"found columns {names}")
    img_type = schema.field("img").type
    if (
        not pa.types.is_struct(img_type)
        or img_type.get_field_index("bytes") < 0
        or not (
            pa.types.is_binary(img_type.field("bytes").type) or pa.types.is_large_binary(img_type.field("bytes").type)
        )
    ):
        raise _parquet_schema_error(path, f"column img has type {img_type}")
    if not pa.types.is_integer(schema.field("label").type):
        raise _parquet_schema_error(path, f"column label has type {schema.field('label').type}")


def _checked_parquet(path: Path) -> pq.ParquetFile:
    """A CIFAR-style parquet file, opened (memory-mapped) after checking its schema."""
    try:
        parquet = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_schema_error(path, f"not a readable parquet file ({type(exc).__name__})") from exc
    _check_parquet_schema(path, parquet.schema_arrow)
    return parquet


def _read_parquet(path: Path, columns: Sequence[str]) -> pa.Table:
    """Read ``columns`` of a CIFAR-style parquet file after checking its schema."""
    return _checked_parquet(path).read(columns=list(columns))


def _take_parquet_rows(path: Path, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """``rows`` of ``columns`` of a CIFAR-style file, in the order given, streaming it
    :data:`PARQUET_BATCH_ROWS` rows at a time."""
    return take_parquet_rows(_checked_parquet(path), rows, columns)


@functools.lru_cache(maxsize=8)
def _parquet_labels(path: str, mtime_ns: int) -> np.ndarray:
    # mtime_ns is part of the cache key only, so a rewritten file is read again.
    del mtime_ns
    labels = _read_parquet(Path(path), ["label"]).column("label").to_numpy().astype(np.int64)
    labels.flags.writeable = False
    return labels


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse a gzipped idx file (magic 0x0000 0x08 ndim, big-endian int32 dims, uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise ValueError(f"{path}: not a uint8 idx file with {expected_ndim} dimension(s)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=expected_ndim, offset=4))
    offset = 4 + 4 * expected_ndim
    if len(raw) - offset != math.prod(dims):
        raise ValueError(f"{path}: idx header says {dims} but holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=8)
def _idx_labels(path: str, mtime_ns: int) -> np.ndarray:
    del mtime_ns  # cache key only
    labels = _read_idx(Path(path), 1).astype(np.int64)
    labels.flags.writeable = False
    return labels


@functools.lru_cache(maxsize=2)
def _idx_images(path: str, mtime_ns: int) -> np.ndarray:
    # Decompressed once per process: a cross-device run's clients each take a few rows of it.
    del mtime_ns  # cache key only
    images = _read_idx(Path(path), 3)
    images.flags.writeable = False
    return images


def _hub_labels(source: DataSource, split: Split) -> np.ndarray:
    table = registry.load_hub(source.location)[split].select_columns(["label"]).with_format("arrow")[:]
    return table.column("label").to_numpy().astype(np.int64)


def _derived_labels(source: DataSource, split: Split) -> np.ndarray:
    assert source.base is not None
    return canvas_labels(registry_set(split, source.base))


LabelReader = Callable[[DataSource, Split], np.ndarray]
# Labels of a split by source kind, without decoding an image (a segmentation set's are one class
# per image for partitioning: fedcsg.data.segmentation.canvas_labels, fedcsg.data.hf_parquet.mask_label).
LABEL_READERS: dict[str, LabelReader] = {
    "parquet": lambda source, split: _parquet_labels(*stamped(source.path(split))),
    "idx": lambda source, split: _idx_labels(*stamped(source.files(split)[1])),
    "hub": _hub_labels,
    "derived": _derived_labels,
    "hf-images": lambda source, split: hf_parquet.shard_labels(source.files(split)),
    "hf-masks": lambda source, split: hf_parquet.mask_labels(source.files(split)),
}


def _source_labels(source: DataSource, split: Split) -> np.ndarray:
    """Read-only labels of ``split`` (cached per file and modification time where read from files)."""
    return LABEL_READERS[source.kind](source, split)


def dataset_spec(
    dataset: str,
    image_size: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
    folder: FolderSettings | None = None,
) -> DatasetSpec:
    """The spec of ``dataset`` at the run's ``image-size``: a registry set's
    (:func:`~fedcsg.data.registry.sized_spec`), or a folder set's, found from the data in ``data_dir``
    (:func:`~fedcsg.data.folders.folder_spec`). The one place a run's spec is looked up."""
    del hub_name  # where a registry set is read from changes nothing of its spec
    if dataset in FOLDER_SETS:
        return folders.folder_spec(dataset, data_dir, image_size, folder)
    return sized_spec(dataset, image_size)


def load_labels(
    dataset: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
    folder: FolderSettings | None = None,
) -> np.ndarray:
    """Read the labels of one split without decoding any image.

    Parameters
    ----------
    dataset, split, data_dir, hub_name, folder
        As for :func:`load_split`.

    Returns
    -------
    numpy.ndarray
        ``int64`` labels ``[N]`` in file row order (a fresh, writable copy). For a segmentation set,
        one class per image to partition by: fashion-mnist-seg's topmost item's class (0..9), voc's
        most frequent object class of the mask (1..20, else 0), read from the masks alone.
    """
    check_split(split)
    if dataset in FOLDER_SETS:
        return folders.open_folder(dataset, data_dir, folder).labels(split).copy()
    source = resolve_source(dataset, data_dir, hub_name=hub_name)
    labels = _source_labels(source, split).copy()
    classes = source.spec.num_classes
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise ValueError(
            f"{_origin(source, split)}: row {int(bad[0])}: label {int(labels[bad[0]])} is not accepted: a class in "
            f"0..{classes - 1} is"
        )
    return labels


def _origin(source: DataSource, split: Split) -> str:
    """What a split is read from, for a message: its file, else its files' folder, else the hub name."""
    try:
        files = source.files(split)
    except ValueError:  # the hub, or derived from another set
        return source.location
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"


def check_images(
    dataset: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
    folder: FolderSettings | None = None,
) -> None:
    """Open the header of every image of a split read from parquet files or a folder (no pixel
    decoded; about 2 s for CIFAR-10's 60,000 images, cached per file and modification time): a null
    image, bytes that are no image, an image of another size than the data set's (CIFAR-style files)
    or of more pixels than :func:`~fedcsg.data.hf_parquet.max_pixels` (files of any size) is a
    one-line ValueError naming the file (and the row), before a run writes anything."""
    if dataset in FOLDER_SETS:
        folders.open_folder(dataset, data_dir, folder).modes(split)
        return
    source = resolve_source(dataset, data_dir, hub_name=hub_name)
    height, width = source.spec.image_size
    pixels = hf_parquet.max_pixels(max(height, width))
    if source.kind == "parquet":
        hf_parquet.check_headers(source.path(split), "img", pixels, (width, height))
    elif source.kind in ("hf-images", "hf-masks"):
        for path in source.files(split):
            hf_parquet.check_headers(path, "image", pixels)


def _select_rows(num_rows: int, indices: Sequence[int] | np.ndarray | None, limit: int | None, seed: int) -> np.ndarray:
    """Row numbers to load: ``indices`` (or all rows), then the first ``limit`` of a seeded shuffle."""
    if indices is None:
        rows = np.arange(num_rows, dtype=np.int64)
    else:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
            bad = rows[(rows < 0) | (rows >= num_rows)][0]
            raise ValueError(f"index {int(bad)} out of range; accepted: 0 <= index < {num_rows}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        # A uniformly random subset is class-balanced in expectation, unlike a prefix of a
        # class-ordered file (the CIFAR-10 copy is sorted by class).
        order = np.random.default_rng(seed).permutation(rows.size)[: int(limit)]
        rows = rows[order]
    return rows


def _decode_images(blobs: Sequence[bytes | None], spec: DatasetSpec, origin: str, rows: np.ndarray) -> np.ndarray:
    """Decode encoded images (of file rows ``rows``) into ``uint8 [N, H, W, C]``, checking every size
    against ``spec`` from the image's header, before its pixels are decoded; a one-line ValueError
    naming ``origin`` and the row otherwise."""
    mode = "RGB" if spec.in_channels == 3 else "L"
    height, width = spec.image_size
    out = np.empty((len(blobs), height, width, spec.in_channels), dtype=np.uint8)
    pixels = hf_parquet.max_pixels(max(height, width))
    for i, (blob, row) in enumerate(zip(blobs, rows.tolist(), strict=True)):
        image = hf_parquet.open_image(blob, origin, row, pixels)
        if image.size != (width, height):
            raise ValueError(
                f"{origin}: row {row}: image is {image.size[0]}x{image.size[1]}, expected {width}x{height}"
            )
        image = hf_parquet.decode(blob, origin, row, mode, pixels)
        out[i] = np.asarray(image).reshape(height, width, spec.in_channels)
    return out


def _nchw(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2)


def _load_parquet_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    # Only the selected rows are kept and decoded.
    path = source.path(split)
    taken = _take_parquet_rows(path, rows, ["img", "label"])
    blobs = taken.column("img").combine_chunks().field("bytes").to_pylist()
    images = _decode_images(blobs, spec, str(path), rows)
    labels = taken.column("label").to_numpy().astype(np.int64)
    return _nchw(images), labels


def _load_idx_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    image_path = source.files(split)[0]
    images = _idx_images(*stamped(image_path))
    labels = _source_labels(source, split)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != spec.image_size:
        raise ValueError(
            f"{image_path}: holds images {images.shape} for {labels.shape[0]} labels, "
            f"expected [N, {spec.image_size[0]}, {spec.image_size[1]}]"
        )
    return images[rows][:, None], labels[rows]


def _load_hub_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    ds = registry.load_hub(source.location)[split].select_columns([spec.hub_image_column, "label"])
    # Undecoded images give the same struct {bytes, path} as the parquet copy.
    ds = ds.cast_column(spec.hub_image_column, datasets.Image(decode=False))
    table = ds.with_format("arrow")[:]
    taken = table.take(pa.array(rows, type=pa.int64()))
    blobs = taken.column(spec.hub_image_column).combine_chunks().field("bytes").to_pylist()
    images = _decode_images(blobs, spec, f"hub:{source.location}", rows)
    return _nchw(images), taken.column("label").to_numpy().astype(np.int64)


def _load_derived_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Selected canvases of a derived segmentation set, masks as ``uint8 [n, H, W]`` labels."""
    assert source.base is not None
    pasted = registry_set(split, source.base)
    return pasted.images[rows][:, None], pasted.masks[rows]


def _load_hf_image_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    size = spec.image_size[0]
    return hf_parquet.take_classification(source.files(split), rows, size, train=split == "train", seed=seed)


def _load_hf_mask_rows(
    source: DataSource, split: Split, rows: np.ndarray, spec: DatasetSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    return hf_parquet.take_voc(source.files(split), rows, spec.image_size[0])


def load_source(source: DataSource, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``split`` of a found source, decoded at its own size: images ``uint8 [N, C, H, W]``
    and labels (what a derived set is built from)."""
    rows = np.arange(_source_labels(source, split).shape[0], dtype=np.int64)
    return ROW_READERS[source.kind](source, split, rows, source.spec, 0)


@functools.lru_cache(maxsize=4)
def registry_set(split: Split, base: DataSource) -> PastedSet:
    """The registry's ``fashion-mnist-seg`` split (:data:`~fedcsg.data.segmentation.DERIVED_ROWS`
    canvases, seed 0) from the Fashion-MNIST files at ``base`` (found by
    :func:`~fedcsg.data.registry.resolve_source`), cached; the same canvases as
    ``fashion_mnist_seg(split, DERIVED_ROWS[split])``."""
    images, labels = load_source(base, split)
    return paste_items(images[:, 0], labels, DERIVED_ROWS[split], split_seed(0, split))


def fashion_mnist_seg(
    split: Split,
    count: int,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
) -> PastedSet:
    """``count`` canvases of the derived set (:mod:`fedcsg.data.segmentation`) from Fashion-MNIST's
    ``split``, seeded by ``seed`` and the split (:func:`~fedcsg.data.segmentation.split_seed`)."""
    source = load_split("fashion-mnist", split, data_dir, hub_name=hub_name)
    return paste_items(source.images[:, 0].numpy(), source.labels.numpy(), count, split_seed(seed, split))


RowReader = Callable[[DataSource, Split, np.ndarray, DatasetSpec, int], tuple[np.ndarray, np.ndarray]]
# Decoded rows of a split by source kind: (source, split, rows, the spec at the run's image size,
# seed) -> images uint8 [n, C, H, W] and labels int64 [n] or masks uint8 [n, H, W].
ROW_READERS: dict[str, RowReader] = {
    "parquet": _load_parquet_rows,
    "idx": _load_idx_rows,
    "hub": _load_hub_rows,
    "derived": _load_derived_rows,
    "hf-images": _load_hf_image_rows,
    "hf-masks": _load_hf_mask_rows,
}


@dataclass(frozen=True)
class ImageData:
    """An in-memory image set.

    Attributes
    ----------
    images : torch.Tensor
        ``uint8 [N, C, H, W]``.
    labels : torch.Tensor
        ``int64 [N]``.
    spec : DatasetSpec
        The data set the images come from (normalisation statistics, number of classes).
    """

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec

    def __post_init__(self) -> None:
        expected = (self.spec.in_channels, *self.spec.image_size)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or tuple(self.images.shape[1:]) != expected:
            raise ValueError(
                f"images must be uint8 [N, {', '.join(map(str, expected))}], "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        masks = (self.images.shape[0], *self.images.shape[2:])
        is_mask = self.labels.dtype == torch.uint8 and tuple(self.labels.shape) == masks
        if not is_mask and (self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],)):
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}] (classes) or uint8 [{', '.join(map(str, masks))}] "
                f"(segmentation masks), got {self.labels.dtype} {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_split(
    dataset: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    limit: int | None = None,
    *,
    seed: int = 0,
    hub_name: str | None = None,
    image_size: int = 0,
    folder: FolderSettings | None = None,
) -> ImageData:
    """Load (decode) selected rows of one split into memory.

    Parameters
    ----------
    dataset : str
        A name in :data:`~fedcsg.data.registry.DATASETS`.
    split : {"train", "test"}
        Which split.
    data_dir : str or path-like, optional
        See :func:`resolve_source`.
    indices : sequence of int, optional
        Row numbers to load, in this order (e.g. from :func:`partition_indices`); default all rows.
    limit : int, optional
        Keep only ``limit`` of the selected rows: the first ``limit`` of a shuffle of them seeded by
        ``seed``. The subset is uniformly random, hence class-balanced in expectation (not exactly),
        and the same for the same ``seed``; rows come in the shuffled order.
    seed : int, default 0
        Seed of the ``limit`` shuffle, and of the any-size sets' training crops (row ``r``'s from
        ``(seed, r)``: drawn once, when the row is decoded).
    hub_name : str, optional
        See :func:`resolve_source`.
    image_size : int, default 0
        The run's ``image-size`` (:func:`dataset_spec`): images of an any-size or folder set are cut to
        ``image_size x image_size``, 0 = the set's default; a fixed-size set accepts only 0 or its own size.
    folder : FolderSettings, optional
        How a folder set (:mod:`fedcsg.data.folders`) in ``data_dir`` is read; ignored for the registry's sets.

    Returns
    -------
    ImageData
        ``uint8 [n, C, H, W]`` images and ``int64 [n]`` labels (``uint8 [n, H, W]`` masks for a
        segmentation set), with the spec at that image size.

    Notes
    -----
    Labels are read first and rows chosen before any image is decoded, so the cost is proportional
    to the number of rows returned (plus reading the compressed files once).
    """
    check_split(split)
    spec = dataset_spec(dataset, image_size, data_dir, folder=folder)
    if dataset in FOLDER_SETS:
        found = folders.open_folder(dataset, data_dir, folder)
        rows = _select_rows(found.labels(split).shape[0], indices, limit, seed)
        images = found.images(split, rows, spec.image_size[0], "L" if spec.in_channels == 1 else "RGB")
        return _image_data(images, found.labels(split)[rows], spec)
    source = resolve_source(dataset, data_dir, hub_name=hub_name)
    num_rows = _source_labels(source, split).shape[0]
    rows = _select_rows(num_rows, indices, limit, seed)
    images, labels = ROW_READERS[source.kind](source, split, rows, spec, seed)
    if spec.task == "classification" and labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{source.location}: labels outside 0..{spec.num_classes - 1} in split {split!r}")
    return _image_data(images, labels, spec)


def _image_data(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> ImageData:
    # Contiguous so per-batch gathers are plain memory copies.
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        spec=spec,
    )
