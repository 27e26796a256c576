"""The paper's large systems: torchvision's ImageNet ResNet-50 and DeepLabV3 (ResNet-50 / ResNet-101
backbones), built without downloading weights, for counting and converting (Omidvar et al. 2021,
Sec. 5: ResNet-50 25.56M -> 15.16M with 16x16x3x3 slices and 128-dim codes; DeepLabV3 about 2.3x).

Only the 3x3 convs become CSG convs (the registry entries configure a 3x3 slice alone), with their
stride, padding and dilation kept: in DeepLabV3 that is every 3x3 conv of the backbone (dilated in
layer3 and layer4), the three atrous ASPP branches and the head's 3x3 conv. The 7x7 stem, the 1x1
convs (bottleneck reductions and expansions, shortcut projections, ASPP's 1x1 branch, pooling branch
and projection, the classifier), BatchNorm and the fully connected layer stay ordinary, as in the
paper. See docs/paper-systems.md for the counts.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

SEGMENTATION_CLASSES = 21  # Pascal VOC 2012: 20 classes and background


def _replace_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """``conv`` itself for 3 input channels, else a fresh conv of the same geometry on ``in_channels``."""
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def imagenet_resnet50(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ImageNet ResNet-50 (7x7 stride-2 stem, max-pool, bottlenecks 3-4-6-3), no weights."""
    from torchvision import models as tv_models  # imported on use: torchvision.models costs ~2 s at start-up

    model = tv_models.resnet50(weights=None, num_classes=num_classes)
    model.conv1 = _replace_stem(model.conv1, in_channels)
    return model


def deeplabv3_builder(depth: int) -> Callable[[int, int], nn.Module]:
    """A registry builder of torchvision's DeepLabV3 with a ResNet-``depth`` backbone (50 or 101):
    output stride 8, ASPP rates 12 / 24 / 36, no auxiliary head, no weights. Its forward returns
    ``{"out": logits}`` at the input's size."""
    if depth not in (50, 101):
        raise ValueError(f"DeepLabV3 backbone depth {depth!r} is not accepted: 50 or 101 is")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        from torchvision.models import segmentation

        builder = segmentation.deeplabv3_resnet50 if depth == 50 else segmentation.deeplabv3_resnet101
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        model.backbone.conv1 = _replace_stem(model.backbone.conv1, in_channels)
        return model

    return build
