"""Batching: :class:`TensorBatches`, a ``DataLoader`` stand-in that augments and normalises on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fedcsg.data.readers import ImageData

DEVICE_DATA_BYTES = 1 << 30  # a data set up to 1 GiB goes to the GPU whole (data_on); a larger one is pinned


def draw_crops(batch: int, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The random draws of :func:`augment_batch` for ``batch`` images, on the CPU: ``int64 [3, batch]``
    (crop offset y, crop offset x, flip 0/1), drawn in that order from ``generator``."""
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = (torch.rand(batch, generator=generator) < 0.5).long()
    return torch.stack((offset_y, offset_x, flip))


def crop_flip(images: torch.Tensor, draws: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop with zero padding and flip ``images`` ``[B, C, H, W]`` by ``draws`` (:func:`draw_crops`,
    on the images' device), vectorised over the batch, in one gather; no host synchronisation."""
    batch, channels, height, width = images.shape
    device = images.device
    offset_y, offset_x, flip = draws[0], draws[1], draws[2].bool()
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    ys = offset_y[:, None] + torch.arange(height, device=device)  # [B, H]
    cols = torch.arange(width, device=device)
    # A flip is a reversed column index, folded into the same gather as the crop.
    xs = offset_x[:, None] + torch.where(flip[:, None], width - 1 - cols, cols)  # [B, W]
    b = torch.arange(batch, device=device)[:, None, None, None]
    c = torch.arange(channels, device=device)[None, :, None, None]
    return padded[b, c, ys[:, None, :, None], xs[:, None, None, :]]


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
    draws = draw_crops(images.shape[0], generator, padding)
    return crop_flip(images, draws.to(images.device), padding)


def draw_flips(batch: int, generator: torch.Generator) -> torch.Tensor:
    """The draws of :func:`flip_pairs` for ``batch`` images: ``int64 [1, batch]``, 1 = flip."""
    return (torch.rand(batch, generator=generator) < 0.5).long()[None]


def flip_pairs(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image of ``[B, C, H, W]`` and its mask ``[B, H, W]`` horizontally together, with
    probability 1/2 (drawn on the CPU ``generator``, or given as :func:`draw_flips`' draws on the
    images' device): a segmentation batch's augmentation, since a padded crop would need the masks
    padded with the ignore label."""
    draws = draw_flips(images.shape[0], generator) if isinstance(generator, torch.Generator) else generator
    flip = draws[0].to(images.device).bool()
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

    def _epoch_draws(self, generator: torch.Generator) -> torch.Tensor | None:
        """The epoch's augmentation draws, batch after batch in the order one batch at a time would
        draw them (so the numbers do not depend on the device), ``[k, n]`` on the device: moved in
        one copy from pinned memory that does not wait on the GPU, not one blocking copy per batch."""
        if not self.augment:
            return None
        sizes = [min(self.batch_size, len(self.data) - i * self.batch_size) for i in range(len(self))]
        if self.data.labels.dim() == 3:
            draws = [draw_flips(size, generator) for size in sizes]
        else:
            draws = [draw_crops(size, generator, self.padding) for size in sizes]
        joined = torch.cat(draws, dim=1) if draws else torch.zeros((1, 0), dtype=torch.long)
        return to_device(joined, self.device)

    def _batches(self, order: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = self._epoch_draws(generator)
        data_device = self.data.images.device
        order = to_device(order, data_device)
        for batch_index in range(len(self)):
            window = slice(batch_index * self.batch_size, (batch_index + 1) * self.batch_size)
            idx = order[window]
            x = to_device(self.data.images[idx], self.device)
            y = to_device(self.data.labels[idx], self.device)
            if draws is not None:
                # On uint8: the gather moves 4x fewer bytes, and zero padding is black, as with
                # torchvision's RandomCrop(padding=4) applied before ToTensor/Normalize.
                if y.dim() == 3:
                    x, y = flip_pairs(x, y, draws[:, window])
                else:
                    x = crop_flip(x, draws[:, window], self.padding)
            yield normalize_batch(x, self._mean, self._std), (y.long() if y.dim() == 3 else y)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a CUDA device from pinned memory without
    blocking the host (the copy is ordered on the current stream before the kernels that read it)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def data_on(data: ImageData, device: torch.device | str, limit_bytes: int = DEVICE_DATA_BYTES) -> ImageData:
    """``data`` with its images and labels on ``device`` when they take at most ``limit_bytes`` there
    (a client's partition for a round, the server's test set for a run), else in pinned memory, from
    which each batch is copied without blocking; ``data`` itself on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return data
    size = data.images.nbytes + data.labels.nbytes
    if size <= limit_bytes:
        return ImageData(data.images.to(device), data.labels.to(device), data.spec)
    return ImageData(data.images.pin_memory(), data.labels.pin_memory(), data.spec)
