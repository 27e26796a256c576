"""Image data sets, federated partitions and tensor batching for fedcsg.

Two data sets are supported, CIFAR-10 and Fashion-MNIST. Both are held in memory as one
``uint8`` tensor ``[N, C, H, W]`` plus an ``int64`` label tensor (:class:`ImageData`), so a client
in a simulation decodes only its own rows once and then batches from memory.

Where the data comes from
-------------------------
:func:`resolve_source` looks, in order, in

1. an explicit ``data_dir`` (strict: it must hold the files, no fallback),
2. the directory named by the environment variable ``FEDCSG_DATA_DIR``,
3. the Debian package's directory (Fashion-MNIST only, ``apt-get install dataset-fashion-mnist``),
4. the Hugging Face hub (``datasets.load_dataset(hub_name)``, which also reads the local hub cache).

A data directory holds ``cifar10/{train,test}.parquet`` (schema of the hub dataset
``uoft-cs/cifar10``: ``img`` struct {bytes, path}, ``label`` int64) and/or
``fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (the original idx files).

Reading only what is needed
---------------------------
Labels are read on their own (one parquet column, or the small idx label file), partitions are
computed over labels alone (:func:`partition_indices`), and :func:`load_split` then decodes only
the selected rows. A client holding 500 of 50,000 CIFAR-10 images decodes 500 JPEGs, not 50,000.

Batching
--------
:class:`TensorBatches` replaces ``torch.utils.data.DataLoader``: it draws a seeded permutation per
epoch, gathers a ``uint8`` batch, moves it to the device and only there converts, augments
(random crop with zero padding, horizontal flip; vectorised over the batch) and normalises.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

Split = Literal["train", "test"]
Scheme = Literal["iid", "dirichlet", "shards"]

DATA_DIR_ENV = "FEDCSG_DATA_DIR"
SPLITS: tuple[str, ...] = ("train", "test")
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one supported data set.

    Attributes
    ----------
    name : str
        The name used throughout fedcsg (``"cifar10"``, ``"fashion-mnist"``).
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    in_channels : int
        Image channels (3 for RGB, 1 for grayscale).
    image_size : tuple of int
        ``(height, width)`` of every image.
    mean, std : tuple of float
        Per-channel normalisation statistics of the original training split, in ``[0, 1]`` units.
    hub_name : str
        Hugging Face hub data set used when no local copy is found.
    hub_image_column : str
        Name of the image column in the hub data set (the label column is ``label``).
    local_format : {"parquet", "idx"}
        File format of the local copy.
    local_dirname : str
        Subdirectory of a data directory that holds the local copy.
    system_dir : str or None
        A system-wide install location searched after ``FEDCSG_DATA_DIR`` (Debian package path).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_name: str
    hub_image_column: str
    local_format: Literal["parquet", "idx"]
    local_dirname: str
    system_dir: str | None = None

    def local_files(self, split: Split) -> tuple[str, ...]:
        """File names of ``split`` inside the local directory, images first for idx copies."""
        _check_split(split)
        if self.local_format == "parquet":
            return (f"{split}.parquet",)
        # The idx release names its test split "t10k".
        prefix = "train" if split == "train" else "t10k"
        return (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")


DATASETS: MappingProxyType[str, DatasetSpec] = MappingProxyType(
    {
        # The local copy is a JPEG re-encoding whose statistics differ slightly (mean 0.4913, 0.4821,
        # 0.4465; std 0.2452, 0.2428, 0.2606); the standard values keep results comparable with
        # the literature and with the hub copy.
        "cifar10": DatasetSpec(
            name="cifar10",
            num_classes=10,
            in_channels=3,
            image_size=(32, 32),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            hub_name="uoft-cs/cifar10",
            hub_image_column="img",
            local_format="parquet",
            local_dirname="cifar10",
        ),
        "fashion-mnist": DatasetSpec(
            name="fashion-mnist",
            num_classes=10,
            in_channels=1,
            image_size=(28, 28),
            mean=(0.2860,),
            std=(0.3530,),
            hub_name="zalando-datasets/fashion_mnist",
            hub_image_column="image",
            local_format="idx",
            local_dirname="fashion-mnist",
            system_dir="/usr/share/datasets/fashion-mnist",
        ),
    }
)


def get_spec(dataset: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` of ``dataset``.

    Raises
    ------
    ValueError
        If ``dataset`` is not a supported name.
    """
    try:
        return DATASETS[dataset]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Where one data set was found.

    Attributes
    ----------
    spec : DatasetSpec
        The data set.
    kind : {"parquet", "idx", "hub"}
        ``"parquet"``/``"idx"`` for a local directory, ``"hub"`` for a Hugging Face hub data set.
    location : str
        The directory holding the files, or the hub name.
    """

    spec: DatasetSpec
    kind: Literal["parquet", "idx", "hub"]
    location: str

    def path(self, split: Split) -> Path:
        """Path of ``split``'s file (the image file for idx copies); local sources only."""
        if self.kind == "hub":
            raise ValueError(f"hub source {self.location!r} has no local path")
        return Path(self.location) / self.spec.local_files(split)[0]


def _missing_files(directory: Path, spec: DatasetSpec) -> list[str]:
    return [name for split in SPLITS for name in spec.local_files(split) if not (directory / name).is_file()]


def resolve_source(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
) -> DataSource:
    """Find where ``dataset`` can be read from.

    Parameters
    ----------
    dataset : str
        ``"cifar10"`` or ``"fashion-mnist"``.
    data_dir : str or path-like, optional
        A data directory holding ``<local_dirname>/<files>`` (e.g. ``cifar10/train.parquet``).
        When given it is the only place searched, and a missing file is an error.
    hub_name : str, optional
        Hugging Face hub data set to fall back on instead of ``spec.hub_name``.

    Returns
    -------
    DataSource
        The first location, in the order data_dir / ``FEDCSG_DATA_DIR`` / system directory / hub,
        that holds both splits.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` lacks the files, or if no location holds the data and the hub data set
        cannot be loaded; the message lists every place searched.
    """
    spec = get_spec(dataset)
    if data_dir is not None:
        directory = Path(data_dir) / spec.local_dirname
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data_dir {str(data_dir)!r} does not exist or is not a directory")
        missing = _missing_files(directory, spec)
        if missing:
            raise FileNotFoundError(f"{spec.name} not found in data_dir: missing {', '.join(missing)} in {directory}")
        return DataSource(spec, spec.local_format, str(directory))

    searched: list[str] = []
    candidates: list[Path] = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        candidates.append(Path(env_dir) / spec.local_dirname)
    else:
        searched.append(f"${DATA_DIR_ENV} (unset)")
    if spec.system_dir is not None:
        candidates.append(Path(spec.system_dir))
    for directory in candidates:
        if not _missing_files(directory, spec):
            return DataSource(spec, spec.local_format, str(directory))
        searched.append(str(directory))

    name = hub_name or spec.hub_name
    try:
        _load_hub(name)
    except Exception as exc:  # noqa: BLE001 - offline, missing, auth: all mean "not here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"{spec.name} not found: looked in {'; '.join(searched)}; hub dataset {name!r} failed: {reason}"
        ) from exc
    return DataSource(spec, "hub", name)


@functools.lru_cache(maxsize=4)
def _load_hub(hub_name: str) -> Any:
    """Load (download or read from the hub cache) a hub data set; memory-mapped, so cheap to keep."""
    import datasets  # imported lazily: slow to import and only needed off the local path

    return datasets.load_dataset(hub_name)


# --------------------------------------------------------------------------------------------------
# Reading labels and images
# --------------------------------------------------------------------------------------------------


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


def _read_parquet(path: Path, columns: Sequence[str]) -> pa.Table:
    """Read ``columns`` of a CIFAR-style parquet file after checking its schema."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise _parquet_schema_error(path, f"not a readable parquet file ({type(exc).__name__})") from exc
    _check_parquet_schema(path, schema)
    return pq.read_table(path, columns=list(columns))


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


def _source_labels(source: DataSource, split: Split) -> np.ndarray:
    """Read-only labels of ``split`` (cached per file and modification time)."""
    if source.kind == "hub":
        table = _load_hub(source.location)[split].select_columns(["label"]).with_format("arrow")[:]
        return table.column("label").to_numpy().astype(np.int64)
    files = [Path(source.location) / name for name in source.spec.local_files(split)]
    label_file = files[0] if source.kind == "parquet" else files[1]
    reader = _parquet_labels if source.kind == "parquet" else _idx_labels
    return reader(str(label_file), label_file.stat().st_mtime_ns)


def load_labels(
    dataset: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_name: str | None = None,
) -> np.ndarray:
    """Read the labels of one split without decoding any image.

    Parameters
    ----------
    dataset : str
        ``"cifar10"`` or ``"fashion-mnist"``.
    split : {"train", "test"}
        Which split.
    data_dir : str or path-like, optional
        See :func:`resolve_source`.
    hub_name : str, optional
        See :func:`resolve_source`.

    Returns
    -------
    numpy.ndarray
        ``int64`` labels ``[N]`` in file row order (a fresh, writable copy).
    """
    _check_split(split)
    source = resolve_source(dataset, data_dir, hub_name=hub_name)
    return _source_labels(source, split).copy()


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


def _decode_images(blobs: Sequence[bytes], spec: DatasetSpec, origin: str) -> np.ndarray:
    """Decode encoded images into ``uint8 [N, H, W, C]``, checking every size against ``spec``."""
    mode = "RGB" if spec.in_channels == 3 else "L"
    height, width = spec.image_size
    out = np.empty((len(blobs), height, width, spec.in_channels), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        image = Image.open(io.BytesIO(blob))
        if image.mode != mode:  # the CIFAR JPEGs are RGB already; skipping convert saves a copy
            image = image.convert(mode)
        if image.size != (width, height):
            raise ValueError(f"{origin}: image {i} is {image.size[0]}x{image.size[1]}, expected {width}x{height}")
        out[i] = np.asarray(image).reshape(height, width, spec.in_channels)
    return out


def _load_parquet_rows(path: Path, rows: np.ndarray, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    table = _read_parquet(path, ["img", "label"])
    # take() before decoding: only the selected JPEGs are ever touched.
    taken = table.take(pa.array(rows, type=pa.int64()))
    blobs = taken.column("img").combine_chunks().field("bytes").to_pylist()
    images = _decode_images(blobs, spec, str(path))
    labels = taken.column("label").to_numpy().astype(np.int64)
    return images, labels


def _load_idx_rows(directory: Path, split: Split, rows: np.ndarray, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = spec.local_files(split)
    images = _read_idx(directory / image_name, 3)
    labels = _source_labels(DataSource(spec, "idx", str(directory)), split)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != spec.image_size:
        raise ValueError(
            f"{directory / image_name}: holds images {images.shape} for {labels.shape[0]} labels, "
            f"expected [N, {spec.image_size[0]}, {spec.image_size[1]}]"
        )
    return images[rows][..., None], labels[rows]


def _load_hub_rows(hub_name: str, split: Split, rows: np.ndarray, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    ds = _load_hub(hub_name)[split].select_columns([spec.hub_image_column, "label"])
    # Undecoded images give the same struct {bytes, path} as the parquet copy.
    ds = ds.cast_column(spec.hub_image_column, datasets.Image(decode=False))
    table = ds.with_format("arrow")[:]
    taken = table.take(pa.array(rows, type=pa.int64()))
    blobs = taken.column(spec.hub_image_column).combine_chunks().field("bytes").to_pylist()
    return _decode_images(blobs, spec, f"hub:{hub_name}"), taken.column("label").to_numpy().astype(np.int64)


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
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} {list(self.labels.shape)}"
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
) -> ImageData:
    """Load (decode) selected rows of one split into memory.

    Parameters
    ----------
    dataset : str
        ``"cifar10"`` or ``"fashion-mnist"``.
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
        Seed of the ``limit`` shuffle.
    hub_name : str, optional
        See :func:`resolve_source`.

    Returns
    -------
    ImageData
        ``uint8 [n, C, H, W]`` images and ``int64 [n]`` labels.

    Notes
    -----
    Labels are read first and rows chosen before any image is decoded, so the cost is proportional
    to the number of rows returned (plus reading the compressed file once).
    """
    _check_split(split)
    source = resolve_source(dataset, data_dir, hub_name=hub_name)
    spec = source.spec
    num_rows = _source_labels(source, split).shape[0]
    rows = _select_rows(num_rows, indices, limit, seed)
    if source.kind == "parquet":
        images, labels = _load_parquet_rows(source.path(split), rows, spec)
    elif source.kind == "idx":
        images, labels = _load_idx_rows(Path(source.location), split, rows, spec)
    else:
        images, labels = _load_hub_rows(source.location, split, rows, spec)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{source.location}: labels outside 0..{spec.num_classes - 1} in split {split!r}")
    # NHWC -> NCHW; contiguous so per-batch gathers are plain memory copies.
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        spec=spec,
    )


# --------------------------------------------------------------------------------------------------
# Federated partitions
# --------------------------------------------------------------------------------------------------


class _LabelKey:
    """Hashable stand-in for a label array: equal when contents are equal (used as a cache key)."""

    __slots__ = ("labels", "_digest")

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self._digest = (labels.shape, hashlib.blake2b(labels.tobytes(), digest_size=16).digest())

    def __hash__(self) -> int:
        return hash(self._digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelKey) and self._digest == other._digest


@functools.lru_cache(maxsize=16)
def _partitioner(key: _LabelKey, num_partitions: int, scheme: str, alpha: float, shards: int, seed: int) -> Partitioner:
    """Build the partitioner once; its first ``load_partition`` assigns every partition."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    labels = key.labels
    # Shuffle rows first: IidPartitioner cuts contiguous blocks (no shuffling of its own) and the
    # CIFAR-10 copy is sorted by class; for the label-based schemes it randomises which images of
    # a class end up together. The `row` column maps partitions back to original row numbers.
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    table = datasets.Dataset.from_dict({"label": labels[order], "row": order})
    partitioner: Partitioner
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        # min_partition_size=0: with many partitions tiny or empty ones are expected; the default
        # (10) resamples and raises after 10 tries. self_balancing=False keeps plain Dirichlet.
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=0,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(shards),
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    return partitioner


def partition_indices(
    labels: np.ndarray | Sequence[int],
    num_partitions: int,
    partition_id: int,
    scheme: Scheme,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of one federated partition, computed from labels alone.

    Parameters
    ----------
    labels : array-like of int
        Labels of the whole split in row order (from :func:`load_labels`).
    num_partitions : int
        Number of partitions (clients), ``1 <= num_partitions <= len(labels)``.
    partition_id : int
        Which partition, ``0 <= partition_id < num_partitions``.
    scheme : {"iid", "dirichlet", "shards"}
        ``"iid"``: seeded shuffle cut into equal contiguous blocks (flwr-datasets
        ``IidPartitioner``). ``"dirichlet"``: per-class proportions drawn from Dir(``alpha``)
        (``DirichletPartitioner``, no self-balancing, no minimum size, so partitions can be empty).
        ``"shards"``: label-sorted rows cut into ``num_partitions * shards_per_partition`` equal
        shards, each partition gets ``shards_per_partition`` random shards (``ShardPartitioner``);
        the ``len(labels) mod (num_partitions * shards_per_partition)`` remainder rows are unused.
    alpha : float, default 0.5
        Dirichlet concentration (``"dirichlet"`` only), ``> 0``; smaller is more skewed.
    shards_per_partition : int, default 2
        Shards per partition (``"shards"`` only), ``>= 1``.
    seed : int, default 0
        Seed of the row shuffle and the partitioner. The same arguments give the same indices in
        any process.

    Returns
    -------
    numpy.ndarray
        ``int64`` row indices into ``labels`` (in a seeded random order).

    Notes
    -----
    The partitioner is cached per (label contents, num_partitions, scheme, alpha,
    shards_per_partition, seed), so asking for every partition id in one process partitions once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > labels.shape[0]:
        raise ValueError(f"num_partitions {num_partitions} exceeds the {labels.shape[0]} rows to partition")
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)):
        raise ValueError(f"partition_id must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} out of range; accepted: 0 <= partition_id < {num_partitions}")
    if scheme == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if scheme == "shards":
        if isinstance(shards_per_partition, bool) or not isinstance(shards_per_partition, (int, np.integer)):
            raise ValueError(f"shards_per_partition must be an integer >= 1, got {shards_per_partition!r}")
        if shards_per_partition < 1 or num_partitions * shards_per_partition > labels.shape[0]:
            raise ValueError(
                f"shards_per_partition must be >= 1 with num_partitions * shards_per_partition <= "
                f"{labels.shape[0]} rows, got {shards_per_partition}"
            )
    # Parameters that a scheme ignores are normalised so they do not split the cache.
    partitioner = _partitioner(
        _LabelKey(np.ascontiguousarray(labels, dtype=np.int64)),
        int(num_partitions),
        scheme,
        float(alpha) if scheme == "dirichlet" else 0.0,
        int(shards_per_partition) if scheme == "shards" else 0,
        int(seed),
    )
    with warnings.catch_warnings():
        # datasets' sort (used by ShardPartitioner) passes an option that pyarrow >= 25 deprecates;
        # the result is unaffected and the warning is not actionable here.
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        partition = partitioner.load_partition(int(partition_id))
    # Arrow format: one bulk conversion (iterating the lazy column costs ~10 us per row).
    rows = partition.select_columns(["row"]).with_format("arrow")[:].column("row")
    return rows.to_numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, vectorised over a batch.

    Parameters
    ----------
    images : torch.Tensor
        ``[B, C, H, W]`` of any dtype, on any device.
    generator : torch.Generator
        CPU generator for the crop offsets and flips (CPU so results do not depend on the device).
    padding : int, default 4
        Zero padding on every side; the crop has the input's size, so offsets are ``0 .. 2*padding``.

    Returns
    -------
    torch.Tensor
        Augmented batch, same shape, dtype and device.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch, channels, height, width = images.shape
    device = images.device
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(device)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    ys = offset_y[:, None] + torch.arange(height, device=device)  # [B, H]
    cols = torch.arange(width, device=device)
    # A flip is a reversed column index, folded into the same gather as the crop.
    xs = offset_x[:, None] + torch.where(flip[:, None], width - 1 - cols, cols)  # [B, W]
    b = torch.arange(batch, device=device)[:, None, None, None]
    c = torch.arange(channels, device=device)[None, :, None, None]
    return padded[b, c, ys[:, None, :, None], xs[:, None, None, :]]


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` to ``float32`` ``(x / 255 - mean) / std``; ``mean``/``std`` are ``[C]``."""
    channels = images.shape[1]
    return (images.float().div_(255.0) - mean.view(1, channels, 1, 1)) / std.view(1, channels, 1, 1)


class TensorBatches:
    """Iterable of normalised ``(x, y)`` batches over an :class:`ImageData`, a DataLoader stand-in.

    Each ``iter()`` is one epoch. The epoch's permutation and augmentation come from a CPU
    ``torch.Generator`` seeded with ``seed + epoch``, where ``epoch`` counts the iterations
    started so far (or is set with :meth:`set_epoch`), so runs are reproducible for a seed.

    Parameters
    ----------
    data : ImageData
        The images and labels.
    batch_size : int
        Examples per batch (the last one may be smaller unless ``drop_last``).
    shuffle : bool, default False
        Draw a new permutation per epoch; otherwise keep row order.
    augment : bool, default False
        Random crop (zero padding ``padding``) and horizontal flip, done on the device.
    seed : int, default 0
        Base seed.
    device : torch.device or str, default "cpu"
        Where batches are produced: the ``uint8`` batch is moved there, then converted.
    drop_last : bool, default False
        Drop a final incomplete batch.
    padding : int, default 4
        Crop padding for ``augment``.

    Yields
    ------
    x : torch.Tensor
        ``float32 [B, C, H, W]``, normalised with the data set's mean and std.
    y : torch.Tensor
        ``int64 [B]``.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        padding: int = 4,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.padding = padding
        self.epoch = 0
        self._mean = torch.tensor(data.spec.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(data.spec.std, dtype=torch.float32, device=self.device)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``seed + epoch`` (e.g. when resuming)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        return self._batches(order, generator)

    def _batches(self, order: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        for batch_index in range(len(self)):
            idx = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            x = self.data.images[idx].to(self.device, non_blocking=non_blocking)
            y = self.data.labels[idx].to(self.device, non_blocking=non_blocking)
            if self.augment:
                # On uint8: the gather moves 4x fewer bytes, and zero padding is black, as with
                # torchvision's RandomCrop(padding=4) applied before ToTensor/Normalize.
                x = augment_batch(x, generator, self.padding)
            yield normalize_batch(x, self._mean, self._std), y
