"""Streaming a client's rows of an any-size set (imagenet, voc) from its parquet shards, instead of
decoding the partition into memory: :class:`StreamedSplit` is a client's train data, and
:meth:`StreamedSplit.batches` one :class:`StreamBatches` per round.

Each epoch, a torch DataLoader with ``loader-workers`` worker processes reads the partition: worker
``w`` of ``W`` takes every ``W``-th row of the epoch's permutation (drawn from ``(seed, epoch)``),
reads them in file order, one parquet row group at a time, and decodes them in a shuffle buffer of
:data:`SHUFFLE_ROWS` encoded rows, drawn from ``(seed, epoch, w)``; a classification image gets a
fresh random resized crop and flip each epoch (from ``(seed, epoch, row)``), a segmentation pair
its resize and center crop and a flip drawn the same way. Batches are formed within a worker, the
workers' batches interleaved in turn (torch's order), so a run is the same for the same seed and
worker count. A client holds at most, per worker, one row group of encoded rows, the shuffle buffer
and ``prefetch_factor`` (2) decoded batches: memory is bounded by the loader's buffers, not by the
partition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fedcsg.data import hf_parquet
from fedcsg.data.batches import normalize_batch, to_device
from fedcsg.data.registry import DatasetSpec

SHUFFLE_ROWS = 256  # encoded rows a worker holds to shuffle from (about 28 MB of ImageNet JPEGs)
MASK_COLUMN = "mask"


@dataclass(frozen=True)
class StreamedSplit:
    """A client's rows of an any-size set, read and decoded while it trains.

    ``paths`` are the split's shards, ``rows`` the client's rows (numbered across them), ``spec``
    the set at the run's image size, ``seed`` the run's data seed, ``workers`` the decoding processes.
    """

    paths: tuple[Path, ...]
    rows: np.ndarray
    spec: DatasetSpec
    seed: int
    workers: int

    def __len__(self) -> int:
        return int(self.rows.size)

    def batches(self, batch_size: int, seed: int, device: torch.device | str) -> StreamBatches:
        """The round's batches (``seed`` the round's: each epoch draws from ``(seed, epoch)``)."""
        return StreamBatches(self, batch_size, seed, torch.device(device))


class _Rows(IterableDataset):
    """One epoch of a :class:`StreamedSplit`'s rows, decoded, for one DataLoader."""

    def __init__(self, data: StreamedSplit, seed: int, epoch: int) -> None:
        self.data, self.seed, self.epoch = data, seed, epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
        mine = np.sort(self.data.rows[order[worker::workers]])
        shuffle = np.random.default_rng([self.seed, self.epoch, worker])
        segmentation = self.data.spec.task == "segmentation"
        columns = ["image", MASK_COLUMN] if segmentation else ["image", "label"]
        buffer: list[tuple[Path, int, list]] = []
        for item in hf_parquet.stream_rows(self.data.paths, mine, columns):
            buffer.append(item)
            if len(buffer) >= SHUFFLE_ROWS:
                yield self._decode(buffer.pop(int(shuffle.integers(len(buffer)))))
        while buffer:
            yield self._decode(buffer.pop(int(shuffle.integers(len(buffer)))))

    def _decode(self, item: tuple[Path, int, list]) -> tuple[torch.Tensor, torch.Tensor]:
        path, row, (image, second) = item
        size = self.data.spec.image_size[0]
        if self.data.spec.task != "segmentation":
            decoded = hf_parquet.classification_image(
                image, str(path), row, size, train=True, seed=self.seed, epoch=self.epoch
            )
            return torch.from_numpy(np.array(decoded)), torch.tensor(int(second))
        pixels, mask = hf_parquet.voc_pair(image, second, str(path), row, size)
        if np.random.default_rng([self.seed, self.epoch, row]).random() < 0.5:
            pixels, mask = pixels[..., ::-1], mask[..., ::-1]
        return torch.from_numpy(np.array(pixels)), torch.from_numpy(np.array(mask))


class StreamBatches:
    """Normalised ``(x, y)`` batches on ``device`` of a :class:`StreamedSplit`, as
    :class:`~fedcsg.data.batches.TensorBatches` gives them; each ``iter()`` is one epoch."""

    def __init__(self, data: StreamedSplit, batch_size: int, seed: int, device: torch.device) -> None:
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.epoch = 0
        self._mean = torch.tensor(data.spec.mean, dtype=torch.float32, device=device)
        self._std = torch.tensor(data.spec.std, dtype=torch.float32, device=device)

    def __len__(self) -> int:
        per_worker = [
            len(range(w, len(self.data), max(self.data.workers, 1))) for w in range(max(self.data.workers, 1))
        ]
        return sum(math.ceil(n / self.batch_size) for n in per_worker)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            _Rows(self.data, self.seed, self.epoch),
            batch_size=self.batch_size,
            num_workers=self.data.workers,
            pin_memory=self.device.type == "cuda",
        )
        self.epoch += 1
        for x, y in loader:
            x, y = to_device(x, self.device), to_device(y, self.device)
            yield normalize_batch(x, self._mean, self._std), (y.long() if y.dim() == 3 else y)
