"""The supported data sets (:data:`DATASETS`) and where each is read from (:func:`resolve_source`)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

Split = Literal["train", "test"]

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
        check_split(split)
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
        "fashion-mnist-seg": replace(_FASHION_MNIST, name="fashion-mnist-seg", num_classes=11, image_size=(56, 56)),
    }
)


SEGMENTATION_DATASETS = ("fashion-mnist-seg",)  # labels are uint8 [H, W] masks, not one class per image


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
        that holds both splits. The hub is tried only when neither data_dir nor ``FEDCSG_DATA_DIR``
        is set: a named local place that lacks the data is an error, never a download.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` lacks the files, if ``FEDCSG_DATA_DIR`` is not a directory or it and the
        system directory lack them, or if no location holds the data and the hub data set cannot be
        loaded; the message lists every place searched.
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
    if env_dir:  # a local place was named: never the network instead
        raise FileNotFoundError(
            f"{spec.name} not found: looked in {'; '.join(searched)} (${DATA_DIR_ENV} is set, so the hub is not "
            f"tried; accepted is a directory holding {spec.local_dirname}/{', '.join(spec.local_files('train'))} "
            "and the test files)"
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
