"""Segmentation pieces without Flower: a small DeepLabV3 for small images (torchvision's ASPP on a
dilated 13-conv ResNet), the per-pixel loss with an ignore label, and mean IoU. torchvision's
DeepLabV3-ResNet-50/101 builders are in :mod:`fedcsg.nn.paper_models`.

CSG on a dilated conv
---------------------
:func:`fedcsg.nn.csgify.csgify` keeps every replaced conv's stride, padding and dilation: a dilated 3x3
conv still has a ``[C_out, C_in, 3, 3]`` weight, tiled by 3x3 slices like any other; dilation only
changes where the taps read.

Mean IoU
--------
:func:`confusion_matrix` counts (target, prediction) pairs over the pixels whose target is not
:data:`IGNORE_LABEL`; :func:`mean_iou` is the mean over classes of ``TP / (TP + FP + FN)`` taken over
the classes that occur in the target or the prediction (a class absent from both is not counted,
as in the VOC evaluation over a whole set).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcsg.nn.training import PassStats, _sync

IGNORE_LABEL = 255  # pixels with this target count in neither the loss nor the IoU (VOC's object borders)


class DeepLabV3(nn.Module):
    """``classifier(backbone(x)["out"])`` upsampled (bilinear) to the input size; returns the logits
    ``[B, num_classes, H, W]`` (torchvision's DeepLabV3 returns a dict; the training loops take a tensor).
    Module names are torchvision's (``backbone.*``, ``classifier.*``)."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        out = self.classifier(features["out"] if isinstance(features, dict) else features)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DilatedBlock(nn.Module):
    """A basic residual block whose 3x3 convs may be strided or dilated; a 1x1 conv + BN shortcut
    where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_deeplabv3(
    num_classes: int,
    in_channels: int,
    widths: Sequence[int] = (16, 32, 64),
    aspp_channels: int = 64,
    rates: Sequence[int] = (2, 4, 6),
) -> nn.Module:
    """DeepLabV3 on a small ResNet for small images: a 3x3 stem, three stages of two
    :class:`DilatedBlock` (the second stage strides 2, the third strides 2 then dilates 2; output
    stride 4), torchvision's ASPP (rates ``rates``, ``aspp_channels`` wide) and the DeepLabV3 head
    (3x3 conv, BN, ReLU, 1x1 classifier)."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    first, second, third = widths
    backbone = nn.Sequential(
        nn.Conv2d(in_channels, first, 3, padding=1, bias=False),
        nn.BatchNorm2d(first),
        nn.ReLU(inplace=True),
        DilatedBlock(first, first),
        DilatedBlock(first, first),
        DilatedBlock(first, second, stride=2),
        DilatedBlock(second, second),
        DilatedBlock(second, third, stride=2),
        DilatedBlock(third, third, dilation=2),
    )
    classifier = nn.Sequential(
        ASPP(third, list(rates), aspp_channels),
        nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(aspp_channels),
        nn.ReLU(),
        nn.Conv2d(aspp_channels, num_classes, 1),
    )
    return DeepLabV3(backbone, classifier)


# --------------------------------------------------------------------------------------------------
# Metric and loops
# --------------------------------------------------------------------------------------------------


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore: int = IGNORE_LABEL) -> Tensor:
    """``int64 [num_classes, num_classes]``: entry ``[t, p]`` counts pixels of target class ``t``
    predicted as ``p``, over pixels whose target is not ``ignore``.

    Raises
    ------
    ValueError
        If the shapes differ or a counted target or prediction lies outside ``0 .. num_classes - 1``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {list(prediction.shape)} differs from target shape {list(target.shape)}")
    keep = target != ignore
    t, p = target[keep].long(), prediction[keep].long()
    for name, values in (("target", t), ("prediction", p)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds classes outside 0..{num_classes - 1} (and {ignore} = ignore for targets)")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def count_pixels(
    counts: Tensor, prediction: Tensor, target: Tensor, num_classes: int, ignore: int = IGNORE_LABEL
) -> None:
    """Add a batch's pixels to ``counts``, ``int64 [num_classes**2 + 2]`` on the batch's device, without
    waiting on the device: the first ``num_classes**2`` entries are :func:`confusion_matrix`'s, flattened,
    then the ignored pixels, then the pixels whose target or prediction lies outside the classes
    (:func:`checked_confusion` refuses those at the end of a pass)."""
    t, p = target.reshape(-1).long(), prediction.reshape(-1).long()
    cells = num_classes * num_classes
    inside = (t >= 0) & (t < num_classes) & (p >= 0) & (p < num_classes)
    index = torch.where(t == ignore, cells, torch.where(inside, t * num_classes + p, cells + 1))
    counts.index_add_(0, index, torch.ones_like(index))


def checked_confusion(counts: Tensor, num_classes: int, ignore: int = IGNORE_LABEL) -> Tensor:
    """The confusion matrix of :func:`count_pixels`' ``counts``; a ValueError if a pixel was out of range."""
    if int(counts[-1]) > 0:
        raise ValueError(f"target or prediction holds classes outside 0..{num_classes - 1} (and {ignore} = ignore)")
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean over classes of ``TP / (TP + FP + FN)``, over the classes present in target or prediction
    (0.0 when no pixel was counted)."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    if not bool(present.any()):
        return 0.0
    return float((true_positive[present] / union[present]).mean())


def _seg_pass(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    num_classes: int,
    optimizer: torch.optim.Optimizer | None,
) -> PassStats:
    """One pass; ``loss`` is the mean per-pixel cross-entropy over the images (each image weighs its
    batch's mean over counted pixels), ``accuracy`` the mean IoU over every counted pixel."""
    counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    num_examples = 0
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        if optimizer is not None and y.shape[0] < 2:
            continue  # ASPP's image-pooling branch has BatchNorm on a 1x1 map: one image has no batch statistics
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_LABEL)
        if optimizer is not None:
            loss.backward()
            optimizer.step()
        # A batch whose every pixel is ignored has a NaN mean; masked on the device, not tested on the host.
        batch_loss = loss.detach().double() * y.shape[0]
        total_loss += torch.where(torch.isfinite(batch_loss), batch_loss, 0.0)
        count_pixels(counts, logits.detach().argmax(1), y, num_classes)
        num_examples += int(y.shape[0])
    _sync(device)
    seconds = time.perf_counter() - start
    loss_value = float(total_loss.item()) / num_examples if num_examples else 0.0
    return PassStats(loss_value, mean_iou(checked_confusion(counts, num_classes)), num_examples, seconds)


def seg_train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_classes: int,
) -> PassStats:
    """Train a segmentation model for one pass (per-pixel cross-entropy, ignore label 255); the
    stats' accuracy is the mean IoU measured on the fly, in train mode."""
    model.train()
    return _seg_pass(model, batches, torch.device(device), num_classes, optimizer)


def seg_evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str, num_classes: int
) -> PassStats:
    """Mean per-pixel cross-entropy and mean IoU (as ``accuracy``) of a segmentation model, in eval
    mode under ``torch.no_grad()`` (see :func:`fedcsg.nn.training.evaluate` for why not inference mode)."""
    model.eval()
    with torch.no_grad():
        return _seg_pass(model, batches, torch.device(device), num_classes, None)
