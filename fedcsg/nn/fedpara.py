"""FedPara: convolutions whose weight is the Hadamard product of two low-rank Tucker factors.

FedPara (Hyeon-Woo, Ye-Bin and Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022) stores a conv weight ``W [O, I, k, k]`` as ``W = W1 * W2``
(element-wise), each factor a rank-``r`` Tucker form

    ``Wi[o, c, y, x] = sum_{a, b} Ti[a, b, y, x] * Xi[a, o] * Yi[b, c]``

with a ``r x r x k x k`` core ``Ti`` and factor matrices ``Xi [r, O]``, ``Yi [r, I]``. The
Hadamard product of two rank-``r`` matrices has rank up to ``r^2``, so a small ``r`` gives a
full-rank weight at ``2 * (r^2 k^2 + r (O + I))`` parameters instead of ``O I k^2``.

Rank from a ratio (the paper's rule, also used by Flower's baselines/fedpara): ``r_min =
min(ceil(sqrt O), ceil(sqrt I))`` is the least rank whose product can be full rank, ``r_max`` the
largest rank whose two factors hold no more parameters than the conv itself (the positive root of
``k^2 r^2 + (O + I) r - O I k^2 / 2``, floored), and ``r = ceil((1 - ratio) r_min + ratio r_max)``.

Initialisation: as for CSG's ``kaiming`` init (:mod:`fedcsg.nn.csgify`), every replaced layer starts with
the Kaiming-normal std ``sqrt(2 / fan_in)`` of the conv it replaces: the factors are drawn
normal (``X``, ``Y`` with std ``r^-1/2``, so a core element's std carries through), then both cores
are scaled by the square root of the measured ratio, which makes the generated weight's std exact.

:func:`fedparafy` installs the layers the way :func:`fedcsg.nn.csgify.csgify` installs CSG: every
``nn.Conv2d`` with ``groups == 1``, a square kernel and zero padding except the stem (the first
conv) is replaced; BatchNorm, the classifier and every other module stay ordinary, and a
:class:`~fedcsg.nn.convert.ConversionReport` says what was replaced and why the rest was left.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedcsg.nn.convert import ComputedConv2d, ConversionReport, ConvGeometry, conversion_plan, report_of

# ResNet-20 at 0.45 sends 112,800 parameters against CSG 12x12x3x3/72's 115,426 (2.3% fewer): the
# two compete at equal bytes.
DEFAULT_RATIO = 0.45


def check_ratio(ratio: float) -> float:
    """``ratio`` if it is in ``[0, 1]``, else a one-line ValueError (the one home of the rule)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fedpara-ratio {ratio!r} is outside [0, 1]")
    return ratio


def fedpara_rank(out_channels: int, in_channels: int, kernel_size: int, ratio: float) -> int:
    """FedPara's per-layer rank ``ceil((1 - ratio) r_min + ratio r_max)`` (see the module docstring).

    Raises
    ------
    ValueError
        If ``ratio`` is outside ``[0, 1]``.
    """
    check_ratio(ratio)
    r_min = min(math.ceil(math.sqrt(out_channels)), math.ceil(math.sqrt(in_channels)))
    a, b, c = kernel_size**2, out_channels + in_channels, -out_channels * in_channels * kernel_size**2 / 2
    r_max = math.floor((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    return max(1, math.ceil((1 - ratio) * r_min + ratio * max(r_max, r_min)))


class FedParaConv2d(ComputedConv2d):
    """A conv layer in place of one of ``geometry`` whose weight is ``W1 * W2``, each factor a Tucker form
    of rank ``rank`` (FedPara)."""

    def __init__(self, geometry: ConvGeometry, rank: int) -> None:
        super().__init__(geometry)
        in_channels, out_channels, kernel_size = geometry.in_channels, geometry.out_channels, geometry.kernel_size
        self.rank = rank
        fan_in = in_channels * kernel_size**2
        core_std = (2.0 / fan_in) ** 0.25
        for i in (1, 2):
            self.register_parameter(f"t{i}", nn.Parameter(torch.randn(rank, rank, kernel_size, kernel_size) * core_std))
            self.register_parameter(f"x{i}", nn.Parameter(torch.randn(rank, out_channels) / math.sqrt(rank)))
            self.register_parameter(f"y{i}", nn.Parameter(torch.randn(rank, in_channels) / math.sqrt(rank)))
        self.add_bias()
        with torch.no_grad():
            scale = math.sqrt(math.sqrt(2.0 / fan_in) / self.weight.std().item())
            self.t1.mul_(scale)
            self.t2.mul_(scale)

    @staticmethod
    def _tucker(core: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("abhw,ao,bi->oihw", core, x, y)

    @property
    def weight(self) -> Tensor:
        """The ``[C_out, C_in, k, k]`` weight ``W1 * W2``."""
        return self._tucker(self.t1, self.x1, self.y1) * self._tucker(self.t2, self.x2, self.y2)

    def weight_repr(self) -> str:
        return f"rank={self.rank}"


def fedparafy(model: nn.Module, ratio: float, skip: set[str] | None = None) -> ConversionReport:
    """Replace every eligible conv of ``model`` by a :class:`FedParaConv2d`, in place.

    ``skip`` names convs to keep ordinary (default: the first conv, the stem, as for CSG).

    Raises
    ------
    ValueError
        If ``ratio`` is outside ``[0, 1]``, a skip name is not a conv, or no conv is eligible.
    """
    convs, plan = conversion_plan(model, skip)
    report = report_of(plan, "FedPara")
    if not report.replaced:
        raise ValueError(f"model has no eligible conv for FedPara ({len(convs)} conv(s) found)")
    for name in report.replaced:
        conv = convs[name]
        geometry = ConvGeometry.of(conv)
        rank = fedpara_rank(geometry.out_channels, geometry.in_channels, geometry.kernel_size, ratio)
        layer = FedParaConv2d(geometry, rank)
        model.set_submodule(name, layer.to(conv.weight.device))
    return report
