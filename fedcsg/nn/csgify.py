"""Turning a model into its CSG form and back: the converter settings (:class:`CSGConfig`),
:func:`csgify`, the initial scale of the generated filters, and :func:`materialize` (a plain copy).

Initialisation
--------------
``init="paper"`` keeps the paper's draw (generator Kaiming-normal over ``code_dim``, codes
~ N(0.001, 1)); ``init="kaiming"`` (the default) rescales each layer's codes once so that its
generated filters start at the Kaiming std of the conv they replace (:func:`kaiming_rescale`).
``init="balanced"`` first scales each trainable generator to the std both factors
would share at the Kaiming scale (:func:`balance_generators`), then rescales the codes as
``kaiming`` does: the same generated filters, but generator and codes of comparable std, so the
codes' effective learning rate is not raised by ``1 / s^2``; a frozen generator is left as drawn
(balanced is then kaiming). Why the codes, and what each init measures: docs/csg.md, docs/csg-step.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from fedcsg.nn.convert import ConversionReport, ConvGeometry, conversion_plan, report_of
from fedcsg.nn.csg import (
    GENERATORS_ATTR,
    CSGConv2d,
    SliceGenerator,
    SliceShape,
    SliceSpec,
    clear_generated_cache,
    csg_layers,
    generators,
)

INITS = ("kaiming", "paper", "balanced")  # CSGConfig.init: how generated filters start (see "Initialisation" above)


@dataclass(frozen=True)
class CSGConfig:
    """How :func:`csgify` converts a model.

    Parameters
    ----------
    slices
        One :class:`SliceSpec` per kernel size to replace. The paper's default is 12x12x3x3
        slices with 72-dimensional codes; MobileNetV2 / ShuffleNetV2 add 16x16x1x1 / 16 for the
        pointwise convs.
    frozen
        Use the paper's random binary generator (Kaiming-normal -> sign * 0.5, not trained),
        drawn from ``seed`` so it can be rebuilt anywhere and never sent.
    seed
        Seed of the generator weights (frozen or the trainable one's initialisation).
    skip
        Qualified names of convs to keep as ordinary layers. ``None`` keeps the first conv of
        the network (the stem), as the paper does.
    init
        ``"kaiming"`` (default): each layer's codes are rescaled so that its generated filters
        start with the Kaiming-normal std ``sqrt(2 / fan_in)`` of the conv they replace.
        ``"paper"``: codes ~ N(0.001, 1) as drawn (generated std about 1.41, 4.2 when frozen).
    """

    slices: tuple[SliceSpec, ...] = (SliceSpec(SliceShape(12, 12, 3), 72),)
    frozen: bool = False
    seed: int = 0
    skip: tuple[str, ...] | None = None
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"csg init {self.init!r} is not accepted: one of {', '.join(INITS)} is")
        if not self.slices:
            raise ValueError("a CSG config needs at least one slice shape")
        kernels = [s.shape.kernel_size for s in self.slices]
        if len(set(kernels)) != len(kernels):
            raise ValueError(f"one slice shape per kernel size is accepted, got {[str(s.shape) for s in self.slices]}")


def plan_csg(model: nn.Module, config: CSGConfig) -> tuple[dict[str, nn.Conv2d], ConversionReport]:
    """The convs of ``model`` by name and what :func:`csgify` would replace (it changes nothing, and
    runs on torch's meta device too).

    Raises
    ------
    ValueError
        In one line naming each conv and why it stays ordinary, if CSG can take none of them.
    """
    specs = {spec.shape.kernel_size: spec for spec in config.slices}

    def no_slice(conv: nn.Conv2d) -> str | None:
        k = conv.kernel_size[0]
        return None if k in specs else f"no slice shape configured for {k}x{k} kernels"

    convs, plan = conversion_plan(model, config.skip, no_slice)
    report = report_of(plan, "CSG")
    if not report.replaced:
        left = "; ".join(f"{name}: {reason}" for name, reason in report.left.items()) or "it has no nn.Conv2d"
        shapes = ", ".join(str(s.shape) for s in config.slices)
        raise ValueError(
            f"the model has no conv that CSG can take for slice shapes {shapes} "
            f"(an nn.Conv2d with groups=1, zero padding and a square kernel of a configured size, not the stem): {left}"
        )
    return convs, report


def csgify(model: nn.Module, config: CSGConfig | None = None) -> ConversionReport:
    """Turn ``model`` into its CSG form, in place.

    Every eligible :class:`torch.nn.Conv2d` (``groups == 1``, square kernel with a configured slice
    shape, zero padding) not named in ``config.skip`` is replaced by a :class:`CSGConv2d`; every
    other module is kept. One generator per configured slice shape is installed once, as
    ``model.csg_generators[f"{k}x{k}"]``.

    Returns
    -------
    ConversionReport
        The replaced conv names and, for each conv left, why.

    Raises
    ------
    ValueError
        If the model is already CSG-backed, is a bare container (``nn.Sequential``,
        ``nn.ModuleList``, ``nn.ModuleDict``) or has no eligible conv.
    """
    config = config or CSGConfig()
    if hasattr(model, GENERATORS_ATTR):
        raise ValueError("model is already CSG-backed (it has csg_generators)")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"csgify cannot add the generators to a bare {type(model).__name__} (its forward would call them "
            "or it has none): pass a module that holds it as a child"
        )
    convs, report = plan_csg(model, config)
    targets = report.replaced
    specs = {spec.shape.kernel_size: spec for spec in config.slices}
    used_kernels = sorted({convs[name].kernel_size[0] for name in targets})
    generators = nn.ModuleDict()
    for offset, k in enumerate(used_kernels):
        spec = specs[k]
        generators[spec.shape.kernel_key] = SliceGenerator(
            spec.shape, spec.code_dim, frozen=config.frozen, seed=config.seed + offset
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name in targets:
        conv = convs[name]
        generator = generators[f"{conv.kernel_size[0]}x{conv.kernel_size[0]}"]
        layer = CSGConv2d(ConvGeometry.of(conv), generator)
        model.set_submodule(name, layer.to(device))
    model.add_module(GENERATORS_ATTR, generators.to(device))
    if config.init == "balanced":
        balance_generators(model)
    if config.init in ("kaiming", "balanced"):
        kaiming_rescale(model)
    return report


def kaiming_std(layer: CSGConv2d) -> float:
    """Kaiming-normal std ``sqrt(2 / fan_in)`` of the conv ``layer`` replaces (fan_in = C_in * k * k)."""
    return math.sqrt(2.0 / (layer.in_channels * layer.kernel_size**2))


@torch.no_grad()
def kaiming_rescale(model: nn.Module) -> None:
    """Scale each CSG layer's codes so that its generated filters have std :func:`kaiming_std`.

    The scale is measured on the layer's own generated (cropped) weight, so it is exact whatever
    the slice shape, code dim or generator; the generator is left untouched (a frozen one stays
    the bit-for-bit function of its seed) and no random number is drawn.
    """
    for _, layer in csg_layers(model):
        generated = layer.tile(layer.generator(layer.codes))
        layer.codes.mul_(kaiming_std(layer) / generated.std().item())
    clear_generated_cache(model)


@torch.no_grad()
def balance_generators(model: nn.Module) -> None:
    """Scale each trainable generator to std ``t``, the geometric mean over its layers of
    ``sqrt(kaiming_std / sqrt(code_dim))``: the std both factors would share if the generated std
    ``sqrt(code_dim) * std(G) * std(c)`` were the layer's Kaiming std. :func:`kaiming_rescale`
    then scales the codes to make each layer exact, which leaves them near ``t``. A frozen
    generator is left untouched (it stays the bit-for-bit function of its seed).
    """
    for generator in generators(model).values():
        if generator.frozen or not generator.layers:
            continue
        logs = [math.log(kaiming_std(layer) / math.sqrt(generator.code_dim)) / 2 for layer in generator.layers]
        target = math.exp(sum(logs) / len(logs))
        generator.weight.mul_(target / generator.weight.std().item())
    clear_generated_cache(model)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of a CSG model whose nn.Conv2d weights are the generated filters.

    The copy has no generator or codes; its outputs equal the CSG model's. Use it for inference
    on devices that should not carry the generator, or for export.
    """
    plain = copy.deepcopy(model)
    for name, layer in list(csg_layers(plain)):
        conv = layer.geometry.conv2d().to(device=layer.codes.device, dtype=layer.codes.dtype)
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
        plain.set_submodule(name, conv)
    if hasattr(plain, GENERATORS_ATTR):
        delattr(plain, GENERATORS_ATTR)
    return plain
