"""Which images each party of a run holds: the train rows the federation shares, a client's
partition of them (cached per process, and streamed for any-size sets), a device's own folder, and
the server's test split. Functions of a :class:`~fedcsg.spec.config.RunConfig`'s data settings
(:class:`~fedcsg.spec.settings.DataSettings`, which also key the caches)."""

from __future__ import annotations

import functools

import numpy as np

from fedcsg.data.partitions import partition_indices
from fedcsg.data.readers import ImageData, load_labels, load_split
from fedcsg.data.registry import ANY_SIZE_FORMATS, FOLDER_SETS, resolve_source, sized_spec
from fedcsg.data.streaming import StreamedSplit
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import DataSettings


def train_rows(data: DataSettings) -> np.ndarray:
    """Rows of the train split that the federation shares: all, or a seeded subset of ``train-limit``."""
    labels = load_labels(data.dataset, "train", **data.source)
    if data.train_limit == 0 or data.train_limit >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(data.seed).permutation(len(labels))[: data.train_limit])


def data_problem(data: DataSettings) -> str:
    """Why this process cannot open the labels of both splits of ``data`` ("" if it can): the check
    each Ray node runs before a run's first round (:func:`fedcsg.fl.ray_cluster.cluster_resources`)."""
    try:
        for split in ("train", "test"):
            load_labels(data.dataset, split, **data.source)
    except Exception as error:  # noqa: BLE001 - the node reports whatever stops it
        return " ".join(str(error).split()) or type(error).__name__
    return ""


@functools.lru_cache(maxsize=8)
def _partition_rows(data: DataSettings, partition_id: int, num_partitions: int) -> np.ndarray:
    rows = train_rows(data)
    labels = load_labels(data.dataset, "train", **data.source)[rows]
    local = partition_indices(
        labels,
        num_partitions,
        partition_id,
        data.partitioner,
        alpha=data.dirichlet_alpha,
        shards_per_partition=data.shards_per_client,
        seed=data.seed,
    )
    return rows[np.asarray(local, dtype=np.int64)]


def partition_rows(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Train-split rows of one client; the same for every arm of a comparison (they depend only on
    the data settings, :class:`~fedcsg.spec.settings.DataSettings`, which also key the caches)."""
    return _partition_rows(cfg.data_settings, partition_id, num_partitions)


@functools.lru_cache(maxsize=4)
def _client_data(data: DataSettings, partition_id: int, num_partitions: int) -> ImageData:
    rows = _partition_rows(data, partition_id, num_partitions)
    return load_split(data.dataset, "train", indices=rows, seed=data.seed, image_size=data.image_size, **data.source)


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ImageData | StreamedSplit:
    """The train data of one client, at the run's ``image-size``: an any-size set's rows in its
    parquet shards, streamed by ``loader-workers`` processes while it trains (a fresh crop every
    epoch, :mod:`fedcsg.data.streaming`); otherwise, or with ``loader-workers = 0``, the decoded
    images (a few recent clients kept in memory per process; an any-size set's training crops then
    drawn once, from the run's data seed and the row, when they are decoded)."""
    data = cfg.data_settings
    if cfg.loader_workers > 0 and data.dataset not in FOLDER_SETS:
        source = resolve_source(data.dataset, data.data_dir or None, hub_name=data.hub_name or None)
        if source.kind in ANY_SIZE_FORMATS:
            rows = np.sort(_partition_rows(data, partition_id, num_partitions))
            spec = sized_spec(data.dataset, data.image_size)
            return StreamedSplit(source.files("train"), rows, spec, data.seed, cfg.loader_workers)
    return _client_data(data, partition_id, num_partitions)


@functools.lru_cache(maxsize=2)
def _local_data(data: DataSettings) -> ImageData:
    return load_split(data.dataset, "train", seed=data.seed, image_size=data.image_size, **data.source)


def local_data(cfg: RunConfig) -> ImageData:
    """A device's own train data: the whole train split of the node's ``data-dir`` (no partitions,
    no ``train-limit``), at the run's ``image-size``."""
    return _local_data(cfg.data_settings)


@functools.lru_cache(maxsize=2)
def _test_data(data: DataSettings) -> ImageData:
    limit = data.test_limit or None
    return load_split(data.dataset, "test", limit=limit, seed=data.seed, image_size=data.image_size, **data.source)


def test_data(cfg: RunConfig) -> ImageData:
    """The test split (or a seeded subset of ``test-limit`` images) for server-side evaluation."""
    return _test_data(cfg.data_settings)
