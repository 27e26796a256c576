"""What converters that replace a model's convolutions share: the layer base, the plan and the report.

:func:`fedcsg.nn.csgify.csgify` (CSG) and :func:`fedcsg.nn.fedpara.fedparafy` (FedPara) both replace
every eligible :class:`torch.nn.Conv2d` of a model by a layer that computes its weight in forward
(:class:`ComputedConv2d`), leave the stem and every ineligible conv ordinary, and say what they did
in a :class:`ConversionReport`. Which convs are eligible, and why the others are left, is decided
here once (:func:`conversion_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEM_REASON = "skipped by name (ordinary layer)"


@dataclass(frozen=True)
class ConvGeometry:
    """What a replacing layer keeps of the :class:`torch.nn.Conv2d` it replaces (square kernel,
    ``groups=1``): the channels, kernel size, stride, padding, dilation and whether it has a bias."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int | tuple[int, int] = 1
    padding: int | str | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    bias: bool = False

    @classmethod
    def of(cls, conv: nn.Conv2d | ComputedConv2d) -> ConvGeometry:
        """The geometry of ``conv`` (an eligible ``nn.Conv2d``, or a layer that replaced one)."""
        k = conv.kernel_size if isinstance(conv.kernel_size, int) else conv.kernel_size[0]
        return cls(
            conv.in_channels, conv.out_channels, k, conv.stride, conv.padding, conv.dilation, conv.bias is not None
        )

    def conv2d(self) -> nn.Conv2d:
        """A fresh ordinary conv of this geometry."""
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias,
        )


class ComputedConv2d(nn.Module):
    """A conv of a :class:`ConvGeometry` whose ``weight`` a subclass computes (a property).

    Holds the geometry (as :class:`torch.nn.Conv2d` names it) and the forward pass; registers no
    parameter, so a subclass decides what its state is and in which order it is registered
    (:meth:`add_bias` last, where the geometry has one).

    The weight is computed in fp32 even inside an autocast region (autocast then casts it for the
    conv, as it does a stored weight), and laid out in :attr:`memory_format`
    (:meth:`fedcsg.nn.execution.Execution.place` sets it).
    """

    memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self, geometry: ConvGeometry) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = (
            geometry.in_channels,
            geometry.out_channels,
            geometry.kernel_size,
        )
        self.stride, self.padding, self.dilation = geometry.stride, geometry.padding, geometry.dilation
        self.geometry = geometry
        self.bias: nn.Parameter | None = None

    def add_bias(self) -> None:
        """Register the bias (zeros) when the geometry has one."""
        if self.geometry.bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels))

    @property
    def weight(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                weight = self.weight
        else:
            weight = self.weight
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)

    def weight_repr(self) -> str:
        """What the subclass stores instead of the weight, for :meth:`extra_repr`."""
        return ""

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, {self.weight_repr()}"
        )


@dataclass
class ConversionReport:
    """What a converter replaced and what it left, with the reason for each conv left."""

    replaced: list[str]
    left: dict[str, str]
    kind: str = "CSG"

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} conv(s) with {self.kind} convs"]
        lines += [f"  left {name}: {reason}" for name, reason in self.left.items()]
        return "\n".join(lines)


def conv_ineligibility(conv: nn.Conv2d) -> str | None:
    """Why no converter can replace ``conv``, or None."""
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convs stay ordinary)"
    k_h, k_w = conv.kernel_size
    if k_h != k_w:
        return f"non-square kernel {k_h}x{k_w}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    return None


def conversion_plan(
    model: nn.Module,
    skip: Iterable[str] | None,
    also: Callable[[nn.Conv2d], str | None] = lambda conv: None,
) -> tuple[dict[str, nn.Conv2d], dict[str, str | None]]:
    """The model's ``nn.Conv2d`` modules by name, and for each why it stays ordinary (None: replace it).

    ``skip`` names convs to keep (None: the first conv, the stem); ``also`` adds a converter's own
    condition (e.g. a slice shape for the kernel size), asked only of otherwise eligible convs.

    Raises
    ------
    ValueError
        If a skip name is not an ``nn.Conv2d`` of the model.
    """
    convs = {name: m for name, m in model.named_modules() if type(m) is nn.Conv2d}
    if skip is None:
        skip = set(list(convs)[:1])
    elif unknown := set(skip) - set(convs):
        raise ValueError(f"skip names {sorted(unknown)} are not nn.Conv2d modules of the model")
    plan = {
        name: STEM_REASON if name in skip else (conv_ineligibility(conv) or also(conv)) for name, conv in convs.items()
    }
    return convs, plan


def report_of(plan: dict[str, str | None], kind: str) -> ConversionReport:
    """The report of carrying out ``plan`` (from :func:`conversion_plan`)."""
    left = {name: reason for name, reason in plan.items() if reason is not None}
    return ConversionReport(replaced=[name for name in plan if name not in left], left=left, kind=kind)
