"""A user's own CNN, defined outside fedcsg: what `model = "tests.user_cnn:SmallCNN"` names (the tests
run from the checkout's root, as a user runs fedcsg from their project's)."""

from __future__ import annotations

from torch import Tensor, nn

WIDTH = 16  # the stem's channels (a module attribute that is not a factory)


class SmallCNN(nn.Module):
    """Three 3x3 convs (the first stays ordinary, the stem), BatchNorm, global pooling, one linear head."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, WIDTH, 3, padding=1, bias=False),
            nn.BatchNorm2d(WIDTH),
            nn.ReLU(),
            nn.Conv2d(WIDTH, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def depthwise_only(num_classes: int, in_channels: int) -> nn.Module:
    """No conv CSG can take: a stem, a depthwise conv and a 5x5 conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def not_a_model(num_classes: int, in_channels: int) -> int:
    return num_classes * in_channels


def broken(num_classes: int, in_channels: int) -> nn.Module:
    raise RuntimeError("the user's bug")
