"""Federated partitions of a split, computed from its labels alone (flwr-datasets partitioners).

Every partition of a split is computed at once and kept on disk, in ``$FEDCSG_CACHE_DIR/partitions``
(default ``~/.cache/fedcsg/partitions``), one ``.npz`` file of plain integer arrays per (label
contents, partitioner and its arguments, flwr-datasets version). The process that starts a run
computes them (:func:`~fedcsg.fl.simulation.simulate` does, before the first round); a client
that finds the file reads its rows from it and never imports flwr-datasets or Hugging Face
``datasets`` (about 3.4 s and 170 MiB a process on this machine). A client that finds no file
(another machine, a read-only home) computes the partitions itself: the same rows either way.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedcsg.io import atomic_write_bytes

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

Split = Literal["train", "test"]
Scheme = Literal["iid", "dirichlet", "shards"]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
CACHE_DIR_ENV = "FEDCSG_CACHE_DIR"
CACHE_FORMAT = 1  # bump when what a cached file holds, or how partitions are computed, changes


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
    Every partition is computed at once and cached per (label contents, num_partitions, scheme,
    alpha, shards_per_partition, seed), in the process and on disk (:func:`cache_dir`), so asking
    for every partition id partitions once, and a process that finds the file never imports
    flwr-datasets.
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
    rows, bounds = _all_partitions(
        _LabelKey(np.ascontiguousarray(labels, dtype=np.int64)),
        int(num_partitions),
        scheme,
        float(alpha) if scheme == "dirichlet" else 0.0,
        int(shards_per_partition) if scheme == "shards" else 0,
        int(seed),
    )
    return rows[bounds[partition_id] : bounds[partition_id + 1]].copy()


def cache_dir() -> Path:
    """Where computed partitions are kept: ``$FEDCSG_CACHE_DIR/partitions``, by default under
    ``~/.cache/fedcsg``."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fedcsg"
    return Path(root) / "partitions"


@functools.lru_cache(maxsize=16)
def _all_partitions(
    key: _LabelKey, num_partitions: int, scheme: str, alpha: float, shards: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every partition's rows, concatenated, and the ``num_partitions + 1`` bounds between them:
    from the disk cache, or computed (and then written to it)."""
    fields = (CACHE_FORMAT, version("flwr-datasets"), key._digest, num_partitions, scheme, alpha, shards, seed)
    name = hashlib.blake2b(repr(fields).encode(), digest_size=16).hexdigest()
    path = cache_dir() / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as held:
            rows, bounds = held["rows"], held["bounds"]
        if bounds.shape == (num_partitions + 1,) and bounds[0] == 0 and bounds[-1] == rows.size:
            return rows.astype(np.int64, copy=False), bounds.astype(np.int64, copy=False)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent or unreadable: compute it again
    partitioner = _partitioner(key, num_partitions, scheme, alpha, shards, seed)
    parts = [_load_partition(partitioner, pid) for pid in range(num_partitions)]
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum([p.size for p in parts])]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, bounds=bounds)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass  # a read-only cache: every process computes its own
    return rows, bounds


def _load_partition(partitioner: Partitioner, partition_id: int) -> np.ndarray:
    with warnings.catch_warnings():
        # datasets' sort (used by ShardPartitioner) passes an option that pyarrow >= 25 deprecates;
        # the result is unaffected and the warning is not actionable here.
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        partition = partitioner.load_partition(partition_id)
    # Arrow format: one bulk conversion (iterating the lazy column costs ~10 us per row).
    rows = partition.select_columns(["row"]).with_format("arrow")[:].column("row")
    return rows.to_numpy().astype(np.int64)
