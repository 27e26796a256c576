"""Batching: :class:`TensorBatches`, a ``DataLoader`` stand-in that augments and normalises on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fedcsg.data.readers import ImageData


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


def flip_pairs(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image of ``[B, C, H, W]`` and its mask ``[B, H, W]`` horizontally together, with
    probability 1/2 (drawn on the CPU ``generator``): a segmentation batch's augmentation, since a
    padded crop would need the masks padded with the ignore label."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images, torch.where(flip[:, None, None], masks.flip(-1), masks)


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
                if y.dim() == 3:
                    x, y = flip_pairs(x, y, generator)
                else:
                    x = augment_batch(x, generator, self.padding)
            yield normalize_batch(x, self._mean, self._std), (y.long() if y.dim() == 3 else y)
