"""A user's own CNN, defined outside fedcsg: what `model = "tests.user_cnn:SmallCNN"` names (the tests
run from the checkout's root, as a user runs fedcsg from their project's). Ray actors must import it from the
copy fedcsg ships to them, as on a cluster whose nodes do not have the checkout: a Ray run of it starts outside
the checkout, with the checkout on PYTHONPATH (Ray puts the driver's current directory first on every worker's
sys.path, before the shipped copy)."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor, nn

WIDTH = 16  # the stem's channels (a module attribute that is not a factory)
SHIPPED = "py_modules_files"  # where a Ray node unpacks the code of a runtime_env's py_modules


def _refuse_the_checkout_in_a_ray_actor() -> None:
    """A Ray actor (a virtual client) must import this module from the copy of ``tests`` that fedcsg ships
    with Ray's ``runtime_env`` (``py_modules``), not from the checkout that its PYTHONPATH also names: the
    checkout stands for a directory the nodes of a cluster do not have. Any other process (the driver,
    pytest, a SuperNode) imports it from anywhere."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() and SHIPPED not in Path(__file__).parts:
        raise ImportError(f"a Ray actor imported {__file__}, not the copy shipped with Ray's runtime_env")


_refuse_the_checkout_in_a_ray_actor()


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


def sequential_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """The same layers as :class:`SmallCNN`, returned as a bare ``nn.Sequential``."""
    model = SmallCNN(num_classes, in_channels)
    return nn.Sequential(*model.features, model.head)


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
