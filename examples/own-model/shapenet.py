"""The user's own CNN: fedcsg builds it as ``ShapeNet(num_classes, in_channels)``, the class count and
channels found from the image folder, and turns its 3x3 convs (all but the first) into CSG convs."""

from __future__ import annotations

from torch import Tensor, nn


def _block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class ShapeNet(nn.Module):
    """Four 3x3 convs (16, 32, 32, 64 channels; the first, the stem, stays ordinary), global average
    pooling and a linear head."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(in_channels, 16, 1),
            *_block(16, 32, 2),
            *_block(32, 32, 1),
            *_block(32, 64, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
