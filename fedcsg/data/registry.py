"""The supported data sets (:data:`DATASETS`) and where each is read from (:func:`resolve_source`).

Each set has a task (``"classification"``: one int64 class per image; ``"segmentation"``: a uint8
mask per image) and a local format, which is how the readers (:mod:`fedcsg.data.readers`) read it:

- ``"parquet"``: ``{train,test}.parquet``, CIFAR-style rows of fixed-size images (cifar10);
- ``"idx"``: the original gzipped idx files (fashion-mnist);
- ``"derived"``: built from another set's images (fashion-mnist-seg, from fashion-mnist);
- ``"hf-images"``: Hugging Face image-classification parquet, images of any size cut to the run's
  ``image-size`` (imagenet: the ``ILSVRC/imagenet-1k`` layout);
- ``"hf-masks"``: the same with a PNG ``mask`` column (voc: Pascal VOC 2012 segmentation).

The two ``hf-*`` formats are read from a data directory only, never downloaded; their files are
``SPLIT.parquet`` or shards ``SPLIT-*.parquet`` (also under ``data/``, as the hub repositories hold
them), where SPLIT is ``train`` or ``validation`` (fedcsg's ``test``: ImageNet's test split has no labels).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

Split = Literal["train", "test"]
Task = Literal["classification", "segmentation"]
LocalFormat = Literal["parquet", "idx", "derived", "hf-images", "hf-masks", "folder"]
# Data sets described by their own folder (the run's data-dir), not by this registry: their spec is
# found from the data (fedcsg.data.folders; local_format "folder").
FOLDER_SETS: tuple[str, ...] = ("imagefolder", "parquet")
ANY_SIZE_FORMATS: tuple[str, ...] = ("hf-images", "hf-masks")  # images of any size, cut to `image-size`
HF_SPLITS = {"train": "train", "test": "validation"}  # file names of fedcsg's splits in the hf-* formats
MAX_IMAGE_SIZE = 2048

DATA_DIR_ENV = "FEDCSG_DATA_DIR"
SPLITS: tuple[str, ...] = ("train", "test")


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
        ``(height, width)`` of every image; for the any-size formats the default the run's
        ``image-size`` 0 stands for (:func:`sized_spec`).
    mean, std : tuple of float
        Per-channel normalisation statistics of the original training split, in ``[0, 1]`` units.
    hub_name : str
        Hugging Face hub data set used when no local copy is found; "" = none, never downloaded.
    hub_image_column : str
        Name of the image column in the hub data set (the label column is ``label``).
    local_format : {"parquet", "idx", "derived", "hf-images", "hf-masks"}
        How the local copy is read (module docstring).
    local_dirname : str
        Subdirectory of a data directory that holds the local copy.
    system_dir : str or None
        A system-wide install location searched after ``FEDCSG_DATA_DIR`` (Debian package path).
    task : {"classification", "segmentation"}
        What a label is: one class per image, or a ``uint8`` mask per image.
    derived_from : str
        For ``"derived"`` sets, the set whose files they are built from (found as for that set).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_name: str
    hub_image_column: str
    local_format: LocalFormat
    local_dirname: str
    system_dir: str | None = None
    task: Task = "classification"
    derived_from: str = ""

    @property
    def any_size(self) -> bool:
        """Whether the images come in any size and are cut to the run's ``image-size``."""
        return self.local_format in ANY_SIZE_FORMATS

    def local_files(self, split: Split) -> tuple[str, ...]:
        """File names (glob patterns for the any-size formats, any one matching is enough) of ``split``
        inside the local directory, images first for idx copies."""
        check_split(split)
        if self.any_size:
            name = HF_SPLITS[split]
            return (f"{name}.parquet", f"{name}-*.parquet", f"data/{name}-*.parquet")
        if self.local_format == "parquet":
            return (f"{split}.parquet",)
        # The idx release names its test split "t10k".
        prefix = "train" if split == "train" else "t10k"
        return (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")


_FASHION_MNIST = DatasetSpec(
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
)

_IMAGENET = DatasetSpec(
    name="imagenet",
    num_classes=1000,
    in_channels=3,
    image_size=(224, 224),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    hub_name="",
    hub_image_column="image",
    local_format="hf-images",
    local_dirname="imagenet",
)

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
        "fashion-mnist": _FASHION_MNIST,
        # Derived (fedcsg/data/segmentation.py): 56x56 canvases of three Fashion-MNIST items, masks of
        # 11 classes (background 0, item class + 1), built from seed 0 out of the Fashion-MNIST files,
        # which are found as for fashion-mnist. Not Pascal VOC. Normalised with Fashion-MNIST's statistics.
        "fashion-mnist-seg": replace(
            _FASHION_MNIST,
            name="fashion-mnist-seg",
            num_classes=11,
            image_size=(56, 56),
            local_format="derived",
            system_dir=None,
            task="segmentation",
            derived_from="fashion-mnist",
        ),
        # ILSVRC-2012 as the hub's ILSVRC/imagenet-1k parquet (JPEGs of any size); read locally only.
        "imagenet": _IMAGENET,
        # Pascal VOC 2012 segmentation (image + palette PNG `mask`, 21 classes, 255 = ignore); read
        # locally only. ImageNet statistics, as torchvision's DeepLabv3 uses.
        "voc": replace(
            _IMAGENET,
            name="voc",
            num_classes=21,
            image_size=(320, 320),
            local_format="hf-masks",
            local_dirname="voc",
            task="segmentation",
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
    if dataset in FOLDER_SETS:
        raise ValueError(
            f"dataset {dataset!r} is described by its data-dir, not by the registry: its spec is "
            "fedcsg.data.readers.dataset_spec's, found from the data"
        )
    try:
        return DATASETS[dataset]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join([*DATASETS, *FOLDER_SETS])}") from None


def task_of(dataset: str) -> Task:
    """What a label of ``dataset`` is: a folder set's is one class per image."""
    return "classification" if dataset in FOLDER_SETS else get_spec(dataset).task


def sized_spec(dataset: str, image_size: int) -> DatasetSpec:
    """The spec of ``dataset`` at the run's ``image-size``: 0 is the set's own size; an any-size set
    takes any size in 1..:data:`MAX_IMAGE_SIZE` (square); a fixed-size set only its own.

    Raises
    ------
    ValueError
        One line naming the bad size and what is accepted.
    """
    spec = get_spec(dataset)
    own = spec.image_size[0]
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image-size = {image_size!r} is not accepted: an integer is")
    if image_size == 0 or (image_size,) * 2 == spec.image_size:
        return spec
    if not spec.any_size:
        raise ValueError(
            f"image-size = {image_size} is not accepted for {dataset}: its images are "
            f"{spec.image_size[1]}x{spec.image_size[0]}; accepted is 0 or {own}"
        )
    if not 0 < image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image-size = {image_size} is not accepted: 0 ({dataset}'s {own}) or an integer in 1..{MAX_IMAGE_SIZE} is"
        )
    return replace(spec, image_size=(image_size, image_size))


def check_split(split: str) -> None:
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
    kind : {"parquet", "idx", "derived", "hf-images", "hf-masks", "hub"}
        The spec's local format for a local directory, ``"hub"`` for a Hugging Face hub data set:
        what the readers dispatch on.
    location : str
        The directory holding the files, or the hub name (for a derived set, its base's).
    base : DataSource or None
        For a derived set, where the set it is built from was found.
    """

    spec: DatasetSpec
    kind: Literal["parquet", "idx", "derived", "hf-images", "hf-masks", "hub"]
    location: str
    base: DataSource | None = None

    def files(self, split: Split) -> tuple[Path, ...]:
        """The files of ``split`` (shards in name order for the any-size formats); local sources only."""
        if self.kind in ("hub", "derived"):
            raise ValueError(f"{self.kind} source {self.location!r} has no local files")
        return _split_files(Path(self.location), self.spec, split)

    def path(self, split: Split) -> Path:
        """Path of ``split``'s (first) file, the image file for idx copies; local sources only."""
        return self.files(split)[0]


def _split_files(directory: Path, spec: DatasetSpec, split: Split) -> tuple[Path, ...]:
    """The files of ``split`` in ``directory``; for the any-size formats those of the first pattern
    that matches (none: empty)."""
    if not spec.any_size:
        return tuple(directory / name for name in spec.local_files(split))
    for pattern in spec.local_files(split):
        found = sorted(path for path in directory.glob(pattern) if path.is_file())
        if found:
            return tuple(found)
    return ()


def _missing_files(directory: Path, spec: DatasetSpec) -> list[str]:
    if spec.any_size:
        return [" or ".join(spec.local_files(s)) for s in SPLITS if not _split_files(directory, spec, s)]
    return [name for split in SPLITS for name in spec.local_files(split) if not (directory / name).is_file()]


def _layout(spec: DatasetSpec) -> str:
    """The accepted layout of a data directory for ``spec``, in words."""
    files = " or ".join(f"{spec.local_dirname}/{name}" for name in spec.local_files("train"))
    test = f"{HF_SPLITS['test']} (the test split)" if spec.any_size else "the test split"
    return f"a directory holding {files}, and the same for {test}"


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
        A name in :data:`DATASETS`.
    data_dir : str or path-like, optional
        A data directory holding ``<local_dirname>/<files>`` (e.g. ``cifar10/train.parquet``).
        When given it is the only place searched, and a missing file is an error.
    hub_name : str, optional
        Hugging Face hub data set to fall back on instead of ``spec.hub_name``.

    Returns
    -------
    DataSource
        The first location, in the order data_dir / ``FEDCSG_DATA_DIR`` / system directory / hub,
        that holds both splits. The hub is tried only when neither data_dir nor ``FEDCSG_DATA_DIR``
        is set and the set has a hub name (imagenet and voc have none): a named local place that
        lacks the data is an error, never a download. A derived set is found where its base set is.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` lacks the files, if ``FEDCSG_DATA_DIR`` is not a directory or it and the
        system directory lack them, or if no location holds the data and the hub data set cannot be
        loaded (or there is none); the one-line message lists every place searched.
    """
    spec = get_spec(dataset)
    if spec.local_format == "derived":
        base = resolve_source(spec.derived_from, data_dir, hub_name=hub_name)
        return DataSource(spec, "derived", base.location, base)
    if data_dir is not None:
        directory = Path(data_dir) / spec.local_dirname
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data_dir {str(data_dir)!r} does not exist or is not a directory")
        missing = _missing_files(directory, spec)
        if missing:
            raise FileNotFoundError(
                f"{spec.name} not found in data_dir: missing {', '.join(missing)} in {directory} "
                f"(accepted is {_layout(spec)})"
            )
        return DataSource(spec, spec.local_format, str(directory))

    searched: list[str] = []
    candidates: list[Path] = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        if not Path(env_dir).is_dir():
            raise FileNotFoundError(f"${DATA_DIR_ENV} = {env_dir!r} does not exist or is not a directory")
        candidates.append(Path(env_dir) / spec.local_dirname)
    else:
        searched.append(f"${DATA_DIR_ENV} (unset)")
    if spec.system_dir is not None:
        candidates.append(Path(spec.system_dir))
    for directory in candidates:
        if not _missing_files(directory, spec):
            return DataSource(spec, spec.local_format, str(directory))
        searched.append(str(directory))
    if env_dir or not (hub_name or spec.hub_name):  # a local place was named, or there is no hub copy
        why = f"${DATA_DIR_ENV} is set, so the hub is not tried" if env_dir else f"{spec.name} is never downloaded"
        raise FileNotFoundError(
            f"{spec.name} not found: looked in {'; '.join(searched)} ({why}; accepted is {_layout(spec)}, "
            f"named by data-dir or ${DATA_DIR_ENV})"
        )

    name = hub_name or spec.hub_name
    try:
        load_hub(name)
    except Exception as exc:  # noqa: BLE001 - offline, missing, auth: all mean "not here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"{spec.name} not found: looked in {'; '.join(searched)}; hub dataset {name!r} failed: {reason}"
        ) from exc
    return DataSource(spec, "hub", name)


@functools.lru_cache(maxsize=4)
def load_hub(hub_name: str) -> Any:
    """Load (download or read from the hub cache) a hub data set; memory-mapped, so cheap to keep."""
    import datasets  # imported lazily: slow to import and only needed off the local path

    return datasets.load_dataset(hub_name)
