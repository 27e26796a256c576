"""The model zoo: CIFAR ResNets (option A), DenseNet-BC, MobileNetV2, ShuffleNetV2 and a small
Fashion-MNIST CNN (:data:`MODELS`), and the paper's large systems, ImageNet ResNet-50 and DeepLabV3
(:data:`PAPER_MODELS`, :mod:`fedcsg.nn.paper_models`), each buildable plain or CSG-backed through
:func:`fedcsg.nn.csgify.csgify`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcsg.nn.csg import SliceShape, SliceSpec
from fedcsg.nn.csgify import CSGConfig, csgify
from fedcsg.nn.imported_models import ACCEPTED as IMPORTED
from fedcsg.nn.imported_models import imported_builder, is_imported
from fedcsg.nn.paper_models import SEGMENTATION_CLASSES, deeplabv3_builder, imagenet_resnet50
from fedcsg.nn.segmentation import small_deeplabv3


class ZeroPadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample spatially, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Sec. 4.2) with option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, width = [], 16
        for stage_width, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(width, stage_width, stride if i == 0 else 1))
                width = stage_width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseBottleneck(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseTransition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs (Huang et al. 2017): 3 dense blocks, compression 0.5."""

    def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        layers_per_block = (depth - 4) // 6
        width = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for block in range(3):
            for _ in range(layers_per_block):
                blocks.append(DenseBottleneck(width, growth_rate))
                width += growth_rate
            if block < 2:
                blocks.append(DenseTransition(width, width // 2))
                width //= 2
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision import models as tv_models  # imported on use: torchvision.models costs ~2 s at start-up

    model = tv_models.mobilenet_v2(num_classes=num_classes)
    # 32x32 inputs: a stride-1 stem keeps 2x2 maps before pooling instead of 1x1.
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


def _shufflenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision import models as tv_models

    model = tv_models.shufflenet_v2_x1_0(num_classes=num_classes)
    stem = model.conv1[0]
    model.conv1[0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class FashionCNN(nn.Module):
    """A small CNN for 28x28 grayscale images: four 3x3 conv-BN-ReLU layers, two max-pools."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1])]
            layers.append(nn.ReLU(inplace=True))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    ``slices`` is the CSG setting used when the caller names none: the paper's 12x12x3x3 / 72 for
    most models; 8x8x3x3 / 32 for the small Fashion-MNIST CNN, whose convs are too few to repay a
    93k-parameter generator. ``pointwise`` is the 1x1 setting the paper used (MobileNetV2 and
    ShuffleNetV2 have no dense 3x3 conv besides the stem, so their CSG form needs it).
    ``task`` is ``"classification"`` (a federated run can train it) or ``"segmentation"`` (counted
    and converted only). ``num_classes`` is the class count ``fedcsg params`` counts the model with
    when none is given (0: the data set's, 10).
    """

    builder: Callable[[int, int], nn.Module]
    description: str
    slices: SliceSpec = SliceSpec(SliceShape(12, 12, 3), 72)
    pointwise: SliceSpec | None = None
    task: str = "classification"
    num_classes: int = 0


_PAPER_POINTWISE = SliceSpec(SliceShape(16, 16, 1), 16)
_PAPER_LARGE = SliceSpec(SliceShape(16, 16, 3), 128)  # the paper's ImageNet / VOC setting
_DENSENET_PATTERN = re.compile(r"^densenet40-k(\d+)$")

MODELS: dict[str, ModelSpec] = {
    **{
        f"resnet{d}": ModelSpec(lambda nc, ic, d=d: CifarResNet(d, nc, ic), f"CIFAR ResNet-{d}, option-A shortcuts")
        for d in (20, 32, 56, 110)
    },
    "densenet40": ModelSpec(lambda nc, ic: DenseNetBC(40, 36, nc, ic), "DenseNet-BC-40, growth rate 36 (paper)"),
    "mobilenetv2": ModelSpec(_mobilenet_v2, "torchvision MobileNetV2, stride-1 stem", pointwise=_PAPER_POINTWISE),
    "shufflenetv2": ModelSpec(
        _shufflenet_v2, "torchvision ShuffleNetV2 x1.0, stride-1 stem", pointwise=_PAPER_POINTWISE
    ),
    "fmnist-cnn": ModelSpec(
        lambda nc, ic: FashionCNN(nc, ic), "4-conv CNN for 28x28 grayscale", SliceSpec(SliceShape(8, 8, 3), 32)
    ),
}


# Outside the zoo's every-classifier tests: tests/test_paper_models.py (large) and tests/test_segmentation.py (small).
PAPER_MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(
        imagenet_resnet50,
        "torchvision ImageNet ResNet-50, 7x7 stem (paper: 16x16x3x3 / 128)",
        _PAPER_LARGE,
        num_classes=1000,
    ),
    **{
        f"deeplabv3-resnet{d}": ModelSpec(
            deeplabv3_builder(d),
            f"torchvision DeepLabV3, ResNet-{d} backbone, output stride 8 (segmentation: counting only)",
            _PAPER_LARGE,
            task="segmentation",
            num_classes=SEGMENTATION_CLASSES,
        )
        for d in (50, 101)
    },
    "deeplabv3-small": ModelSpec(
        small_deeplabv3,
        "DeepLabV3 on a 13-conv dilated ResNet, ASPP 64 wide, for 56x56 fashion-mnist-seg canvases",
        SliceSpec(SliceShape(8, 8, 3), 32),
        task="segmentation",
        num_classes=11,
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ``densenet40-kN`` builds DenseNet-BC-40 with growth rate N, and a
    name with a ``:`` is imported (:mod:`fedcsg.nn.imported_models`: the user's own, torchvision's, timm's)."""
    if is_imported(name):
        return ModelSpec(imported_builder(name), f"{name} (imported)")
    if name in MODELS:
        return MODELS[name]
    if name in PAPER_MODELS:
        return PAPER_MODELS[name]
    match = _DENSENET_PATTERN.match(str(name))
    if match and int(match.group(1)) > 0:
        growth = int(match.group(1))
        return ModelSpec(lambda nc, ic: DenseNetBC(40, growth, nc, ic), f"DenseNet-BC-40, growth rate {growth}")
    raise ValueError(
        f"unknown model {name!r}: accepted are {', '.join([*MODELS, *PAPER_MODELS])}, densenet40-kN (growth rate N) "
        f"or {IMPORTED}"
    )


def check_trainable(name: str, task: str = "classification") -> None:
    """Raise a one-line ValueError unless ``name`` is a registry model of ``task`` (the run's data
    set's: ``"classification"`` or ``"segmentation"``), which a federated run on that data can train."""
    spec = model_spec(name)
    if spec.task != task:
        trainable = [n for n, s in {**MODELS, **PAPER_MODELS}.items() if s.task == task]
        trainable += ["densenet40-kN"] if task == "classification" else []
        raise ValueError(
            f"model = {name!r} is not accepted for a run: it is a {spec.task} model and the data set is for "
            f"{task}; accepted are {', '.join(trainable)}"
        )


def default_code_dim(shape: SliceShape) -> int:
    """The paper's ratio: a code has 18x fewer numbers than its slice (12x12x3x3 -> 72, 16x16x3x3 -> 128)."""
    return max(1, round(shape.numel / 18))


def model_slice(name: str, slice_shape: str | None = None, code_dim: int | None = None) -> SliceSpec:
    """The slice setting of a registry model: ``slice_shape`` (default: the model's own, e.g. 12x12x3x3
    / 72, or 8x8x3x3 / 32 for fmnist-cnn) with ``code_dim`` (default: the model's own for its own
    slice, else slice numel / 18)."""
    spec = model_spec(name)
    shape = SliceShape.parse(slice_shape) if slice_shape is not None else spec.slices.shape
    if code_dim is None:
        code_dim = spec.slices.code_dim if slice_shape is None else default_code_dim(shape)
    return SliceSpec(shape, code_dim)


def default_csg_config(
    name: str,
    slice_shape: str | None = None,
    code_dim: int | None = None,
    *,
    frozen: bool = False,
    seed: int = 0,
    pointwise_slice: str | None = None,
    pointwise_code_dim: int | None = None,
    init: str = "kaiming",
) -> CSGConfig:
    """The CSG config for a registry model.

    Unset values come from the model's entry: its slice setting, its paper 1x1 setting, and a code
    dim of slice numel / 18 when only a slice shape is given. ``init`` is
    :attr:`fedcsg.nn.csgify.CSGConfig.init` (``"kaiming"`` or the paper's ``"paper"``).
    """
    spec = model_spec(name)
    slices = [model_slice(name, slice_shape, code_dim)]
    if pointwise_slice is not None:
        slices.append(SliceSpec(SliceShape.parse(pointwise_slice), pointwise_code_dim or 16))
    elif spec.pointwise is not None:
        slices.append(SliceSpec(spec.pointwise.shape, pointwise_code_dim or spec.pointwise.code_dim))
    return CSGConfig(slices=tuple(slices), frozen=frozen, seed=seed, init=init)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, csg: CSGConfig | None = None) -> nn.Module:
    """Build a registry model, plain or (with ``csg``) CSG-backed.

    Parameters
    ----------
    name
        One of :data:`MODELS` or :data:`PAPER_MODELS`.
    num_classes, in_channels
        Classifier outputs and input image channels.
    csg
        Conversion settings; ``None`` builds the plain model.
    """
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    model = model_spec(name).builder(num_classes, in_channels)
    if csg is not None:
        csgify(model, csg)
    return model
