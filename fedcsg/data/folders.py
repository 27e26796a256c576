"""Image-classification data in a local folder, described by the folder rather than by the registry
(:data:`~fedcsg.data.registry.FOLDER_SETS`):

- ``"imagefolder"``: torchvision's ImageFolder layout, ``train/CLASS/*`` and ``test/CLASS/*`` (any
  depth below a class folder), every file Pillow reads by its suffix; the classes are the train
  split's class folders in name order, and a test class folder must be one of them;
- ``"parquet"``: Hugging Face parquet files, ``SPLIT.parquet`` or shards ``SPLIT-*.parquet`` (also
  under ``data/``), SPLIT ``train`` and ``test`` or ``validation``, an image column (struct {bytes,
  path}) and an integer label column of any names (found when each kind has one column, or ``image``
  / ``label`` among several; else named by ``image-column`` / ``label-column``); the classes are
  ``0 ..`` the largest label.

A folder with a train split alone is cut by ``test-fraction``: a seeded fraction of its rows (seed
:data:`SPLIT_SEED`, the same for every run seed, so that seeds compare on one test set) is the test split.

Found from the data (:func:`folder_spec`): the class count, the input channels (1 when every train
image is grayscale, else 3) and the per-channel mean and std of the train split at the run's image
size (over at most :data:`STATS_ROWS` of its images, a seeded sample), unless ``norm-mean`` /
``norm-std`` give them. Every image is decoded once in that mode, its shorter side resized to
``image-size`` (0: :data:`DEFAULT_IMAGE_SIZE`) and its center cut square, train and test alike;
training batches are then augmented on the device as CIFAR-10's are (:mod:`fedcsg.data.batches`).
Each process finds these once per folder (cached on the folder's and its splits' modification times).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fedcsg.data import hf_parquet
from fedcsg.data.registry import FOLDER_SETS, MAX_IMAGE_SIZE, DatasetSpec, Split, check_split

DEFAULT_IMAGE_SIZE = 64  # image-size 0 of a folder set
STATS_ROWS = 2000  # train images the normalisation statistics are computed over
SPLIT_SEED = 0  # the test-fraction cut
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
TEST_NAMES = ("test", "validation")  # a parquet folder's test split, in the order looked for
SHARD_PATTERNS = ("{}.parquet", "{}-*.parquet", "data/{}-*.parquet")


@dataclass(frozen=True)
class FolderSettings:
    """How a folder set is read (the run settings of the same names).

    Attributes
    ----------
    image_column, label_column : str
        A parquet folder's columns; "" = found.
    test_fraction : float
        0: the folder holds a test split; in (0, 1): the folder holds a train split alone, and this
        fraction of it is the test split.
    norm_mean, norm_std : str
        Comma-separated per-channel statistics in ``[0, 1]`` units; "" = computed from the train split.
    """

    image_column: str = ""
    label_column: str = ""
    test_fraction: float = 0.0
    norm_mean: str = ""
    norm_std: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test-fraction = {self.test_fraction!r} is not accepted: a number in [0, 1) is")
        for key, text in (("norm-mean", self.norm_mean), ("norm-std", self.norm_std)):
            parse_stats(key, text)


def parse_stats(key: str, text: str) -> tuple[float, ...]:
    """``norm-mean`` / ``norm-std``: "" or comma-separated finite numbers (a std > 0)."""
    if not text.strip():
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    low = 0 if key == "norm-mean" else 1e-6
    if not values or not all(low <= v < float("inf") for v in values):
        raise ValueError(
            f"{key} = {text!r} is not accepted: comma-separated numbers (one a channel, "
            f'{">= 0" if key == "norm-mean" else "> 0"}) or "" (computed from the train split) are'
        )
    return values


def image_size_of(image_size: int) -> int:
    """A folder set's square image size for the run's ``image-size`` (0: :data:`DEFAULT_IMAGE_SIZE`)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 0 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image-size = {image_size!r} is not accepted for a folder set: 0 ({DEFAULT_IMAGE_SIZE}) or an "
            f"integer in 1..{MAX_IMAGE_SIZE} is"
        )
    return image_size or DEFAULT_IMAGE_SIZE


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split of a folder: its ``files`` (an ImageFolder's images, one each; a parquet folder's
    shards), the rows of those files it holds (row ``r`` of the split is ``rows[r]``, numbered across
    the shards) and their labels (read-only)."""

    files: tuple[Path, ...]
    rows: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, eq=False)
class Folder:
    """A folder set as found: its kind (``"imagefolder"`` or ``"parquet"``), directory, a parquet
    folder's columns, the class count and the two splits."""

    kind: str
    directory: Path
    image_column: str
    label_column: str
    num_classes: int
    splits: dict[str, FolderSplit]

    def labels(self, split: Split) -> np.ndarray:
        check_split(split)
        return self.splits[split].labels

    def images(self, split: Split, rows: np.ndarray, size: int, mode: str) -> np.ndarray:
        """Rows ``rows`` of ``split``, decoded in ``mode`` and cut to ``size``: ``uint8 [n, C, size, size]``."""
        part = self.splits[split]
        files = part.rows[rows]
        channels = 1 if mode == "L" else 3
        out = np.empty((rows.size, channels, size, size), dtype=np.uint8)
        pixels = hf_parquet.max_pixels(size)
        if self.kind == "imagefolder":
            for i, index in enumerate(files.tolist()):
                path = part.files[index]
                out[i] = _cut(hf_parquet.decode(path.read_bytes(), str(path), None, mode, pixels), size)
            return out
        columns = [self.image_column, self.label_column]
        for path, table, where in hf_parquet.take_rows(part.files, files, columns, self.label_column):
            blobs = table.column(self.image_column).combine_chunks().field("bytes").to_pylist()
            for i, blob in zip(where, blobs, strict=True):
                out[i] = _cut(hf_parquet.decode(blob, str(path), int(files[i]), mode, pixels), size)
        return out

    def modes(self, split: Split) -> set[str]:
        """The image modes of ``split``, from every image's header (no pixel decoded): a one-line
        ValueError naming the file (and row) of the first that Pillow cannot open."""
        part = self.splits[split]
        pixels = hf_parquet.max_pixels(MAX_IMAGE_SIZE)
        if self.kind == "imagefolder":
            paths = [part.files[i] for i in part.rows.tolist()]
            return {hf_parquet.open_image(p.read_bytes(), str(p), None, pixels).mode for p in paths}
        rows = hf_parquet.stream_rows(part.files, np.sort(part.rows), [self.image_column])
        return {hf_parquet.open_image(blob, str(path), row, pixels).mode for path, row, (blob,) in rows}


def _cut(image: Image.Image, size: int) -> np.ndarray:
    array = np.asarray(hf_parquet.resize_center_crop(image, size, size))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _stamp(directory: Path) -> tuple[tuple[str, int], ...]:
    """Modification times of the folder and what it holds at its top and one level down (the split
    folders and their class folders): a cache key under which a changed folder is read again."""
    paths = [directory, *directory.glob("*"), *directory.glob("*/*")]
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in paths))


def open_folder(dataset: str, data_dir: str | os.PathLike[str] | None, settings: FolderSettings | None) -> Folder:
    """The folder set ``dataset`` in ``data_dir`` (module docstring), checked.

    Raises
    ------
    FileNotFoundError
        One line naming the folder: no data-dir, one that does not exist, a missing split.
    ValueError
        One line naming the file or folder: a class folder with no image, a test class that train
        lacks, an unknown or ambiguous column, a negative label, a test-fraction with a test split.
    """
    if dataset not in FOLDER_SETS:
        raise ValueError(f"dataset {dataset!r} is not a folder set; accepted: {', '.join(FOLDER_SETS)}")
    if not data_dir:
        layout = "train/CLASS/* and test/CLASS/*" if dataset == "imagefolder" else "train*.parquet and test*.parquet"
        raise FileNotFoundError(
            f"dataset = {dataset!r} needs data-dir: accepted is the folder that holds its images ({layout})"
        )
    directory = Path(data_dir).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"data-dir {str(data_dir)!r} does not exist or is not a directory")
    settings = settings or FolderSettings()
    return _open_folder(dataset, directory, settings, _stamp(directory))


@functools.lru_cache(maxsize=4)
def _open_folder(dataset: str, directory: Path, settings: FolderSettings, stamp: tuple) -> Folder:
    del stamp  # cache key only
    if dataset == "imagefolder":
        return _image_folder(directory, settings)
    return _parquet_folder(directory, settings)


def _with_test(
    directory: Path,
    train: tuple[tuple[Path, ...], np.ndarray],
    test: tuple[tuple[Path, ...], np.ndarray] | None,
    settings: FolderSettings,
    what: str,
) -> dict[str, FolderSplit]:
    """The two splits: ``test`` as found, or a seeded ``test-fraction`` of ``train``'s rows."""
    files, labels = train
    if test is not None:
        if settings.test_fraction:
            raise ValueError(
                f"test-fraction = {settings.test_fraction} is not accepted: {directory} holds a test split ({what}); "
                "accepted is 0"
            )
        rows = np.arange(len(labels))
        return {"train": _split(files, rows, labels), "test": _split(test[0], np.arange(len(test[1])), test[1])}
    if settings.test_fraction == 0:
        raise FileNotFoundError(
            f"{directory}: missing split: no {what}; accepted is a test split beside train, or test-fraction "
            "in (0, 1) to cut one from train"
        )
    count = round(len(labels) * settings.test_fraction)
    if not 0 < count < len(labels):
        raise ValueError(
            f"test-fraction = {settings.test_fraction} is not accepted for {directory}: it cuts {count} of "
            f"{len(labels)} train rows; accepted is a fraction leaving at least one row on each side"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_rows, train_rows = np.sort(order[:count]), np.sort(order[count:])
    return {"train": _split(files, train_rows, labels[train_rows]), "test": _split(files, test_rows, labels[test_rows])}


def _split(files: tuple[Path, ...], rows: np.ndarray, labels: np.ndarray) -> FolderSplit:
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    labels.flags.writeable = False
    return FolderSplit(files, rows.astype(np.int64), labels)


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The file suffixes Pillow reads (lower case)."""
    return frozenset(suffix.lower() for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _class_images(class_dir: Path) -> list[Path]:
    images = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in image_suffixes())
    if not images:
        raise ValueError(
            f"{class_dir}: class folder with no image; accepted is a folder of image files Pillow reads "
            "(.png, .jpg, .bmp, .webp, ...)"
        )
    return images


def _class_folders(split_dir: Path) -> list[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{split_dir}: no class folder; accepted is {split_dir.name}/CLASS/IMAGE")
    return folders


def _image_folder(directory: Path, settings: FolderSettings) -> Folder:
    train_dir, test_dir = directory / "train", directory / "test"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"{train_dir}: missing split: imagefolder's data-dir holds train/CLASS/* and test/CLASS/* "
            "(or train/ alone with test-fraction)"
        )
    classes = [p.name for p in _class_folders(train_dir)]
    train = _folder_split(train_dir, classes)
    test = _folder_split(test_dir, classes) if test_dir.is_dir() else None
    splits = _with_test(directory, train, test, settings, "test/")
    return Folder("imagefolder", directory, "", "", len(classes), splits)


def _folder_split(split_dir: Path, classes: list[str]) -> tuple[tuple[Path, ...], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in _class_folders(split_dir):
        if class_dir.name not in classes:
            raise ValueError(
                f"{class_dir}: class {class_dir.name!r} is not a class of train/; accepted are {', '.join(classes)}"
            )
        images = _class_images(class_dir)
        files += images
        labels += [classes.index(class_dir.name)] * len(images)
    return tuple(files), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Hugging Face parquet
# --------------------------------------------------------------------------------------------------


def _shards(directory: Path, name: str) -> tuple[Path, ...]:
    for pattern in SHARD_PATTERNS:
        found = sorted(p for p in directory.glob(pattern.format(name)) if p.is_file())
        if found:
            return tuple(found)
    return ()


def _column(path: Path, schema: pa.Schema, key: str, named: str, kinds: list[str], usual: str) -> str:
    """The ``key`` column (``image-column`` / ``label-column``): ``named``, else the one of ``kinds``,
    else ``usual``."""
    described = ", ".join(f"{f.name} ({f.type})" for f in schema)
    what = "an image column (struct with bytes)" if key == "image-column" else "an integer label column"
    if named:
        if named not in kinds:
            raise ValueError(f"{key} = {named!r} is not {what} of {path}; its columns: {described}")
        return named
    if len(kinds) == 1:
        return kinds[0]
    if usual in kinds:
        return usual
    found = f"columns {', '.join(kinds)} could each be it" if kinds else "none is"
    raise ValueError(f"{path}: {key} not found: {found}; name it with {key} (its columns: {described})")


def _parquet_folder(directory: Path, settings: FolderSettings) -> Folder:
    train = _shards(directory, "train")
    if not train:
        raise FileNotFoundError(
            f"{directory}: missing split: no train.parquet, train-*.parquet or data/train-*.parquet"
        )
    test = next((found for name in TEST_NAMES if (found := _shards(directory, name))), ())
    try:
        schema = pq.read_schema(train[0])
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{train[0]}: not a readable parquet file ({type(error).__name__})") from None
    images = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    integers = [f.name for f in schema if pa.types.is_integer(f.type)]
    image = _column(train[0], schema, "image-column", settings.image_column, images, "image")
    label = _column(train[0], schema, "label-column", settings.label_column, integers, "label")
    found = {"train": (train, _labels(train, label))}
    if test:
        found["test"] = (test, _labels(test, label))
    splits = _with_test(directory, found["train"], found.get("test"), settings, "test or validation parquet files")
    classes = max(int(s.labels.max()) for s in splits.values() if s.labels.size) + 1
    return Folder("parquet", directory, image, label, classes, splits)


def _labels(paths: tuple[Path, ...], label: str) -> np.ndarray:
    labels = hf_parquet.shard_labels(paths, label)
    bad = np.flatnonzero(labels < 0)
    if bad.size:
        raise ValueError(
            f"{paths[0].parent}: row {int(bad[0])} of {label}: label {int(labels[bad[0]])} is not accepted: a class "
            ">= 0 is"
        )
    if not labels.size:
        raise ValueError(f"{paths[0]}: no rows; accepted is a split of at least one image")
    return labels


# --------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------


def folder_spec(
    dataset: str, data_dir: str | os.PathLike[str] | None, image_size: int, settings: FolderSettings | None
) -> DatasetSpec:
    """The :class:`~fedcsg.data.registry.DatasetSpec` of a folder set at the run's ``image-size``
    (module docstring), found from its data; cached per folder state and settings."""
    settings = settings or FolderSettings()
    folder = open_folder(dataset, data_dir, settings)
    return _folder_spec(folder, image_size_of(image_size), settings)


@functools.lru_cache(maxsize=4)
def _folder_spec(folder: Folder, size: int, settings: FolderSettings) -> DatasetSpec:
    channels = 1 if folder.modes("train") <= GRAY_MODES else 3
    mean, std = parse_stats("norm-mean", settings.norm_mean), parse_stats("norm-std", settings.norm_std)
    for key, given in (("norm-mean", mean), ("norm-std", std)):
        if given and len(given) != channels:
            raise ValueError(
                f"{key} = {', '.join(map(str, given))} is not accepted for {folder.directory}: its images have "
                f"{channels} channel(s); accepted is {channels} number(s)"
            )
    if not (mean and std):
        labels = folder.labels("train")
        sample = np.sort(np.random.default_rng(SPLIT_SEED).permutation(labels.size)[:STATS_ROWS])
        pixels = folder.images("train", sample, size, "L" if channels == 1 else "RGB").astype(np.float64) / 255
        mean = mean or tuple(round(float(v), 6) for v in pixels.mean(axis=(0, 2, 3)))
        std = std or tuple(round(max(float(v), 1e-6), 6) for v in pixels.std(axis=(0, 2, 3)))
    return DatasetSpec(
        name=folder.kind,
        num_classes=folder.num_classes,
        in_channels=channels,
        image_size=(size, size),
        mean=mean,
        std=std,
        hub_name="",
        hub_image_column=folder.image_column,
        local_format="folder",
        local_dirname=str(folder.directory),
    )
