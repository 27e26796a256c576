"""Convolutional Slice Generator (CSG) layers and the converter that installs them.

A CSG network does not store its convolution filters. One small shared linear map, the
*generator*, turns low-dimensional *code vectors* into *slices* of filters, and every CSG
convolution owns only the codes of the slices that tile its weight (Omidvar et al.,
"Associative Convolutional Layers", AISTATS 2021).

Tiling layout
-------------
A slice shape ``S_out x S_in x k x k`` and a conv weight ``[C_out, C_in, k, k]`` give a grid of
``n_out = ceil(C_out / S_out)`` by ``n_in = ceil(C_in / S_in)`` blocks. Code row
``r = i * n_in + j`` generates the block that covers output channels ``i*S_out : (i+1)*S_out``
and input channels ``j*S_in : (j+1)*S_in``: element ``[o, c, y, x]`` of the weight is element
``[o % S_out, c % S_in, y, x]`` of slice ``(o // S_out) * n_in + c // S_in``. The padded grid
``[n_out*S_out, n_in*S_in, k, k]`` is then cropped to ``[C_out, C_in, k, k]``. Every slice is a
true ``S_out x S_in x k x k`` block, as the paper intends (the authors' code reshapes the stacked
output row-major, which gives true blocks only when the padded ``C_in`` equals ``S_in``).

Ownership
---------
The generator is registered once per model (``model.csg_generators``) and *handed* to the
layers, never registered under them, so it appears once in ``state_dict()`` and a payload built
from it is not sent once per layer. Each generator knows its layers and produces all of their
weights with one matmul per forward pass; in no-grad mode the generated weights are cached
until a parameter changes (tracked by the tensors' version counters).

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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcsg.nn.convert import ComputedConv2d, ConversionReport, conversion_plan, report_of

GENERATORS_ATTR = "csg_generators"
INITS = ("kaiming", "paper", "balanced")  # CSGConfig.init: how generated filters start (see "Initialisation" above)
FACTORS = ("all", "codes", "generator")  # what one round of local training may update (see freeze_factor)
AGGREGATIONS = ("factors", "alternate")  # csg-aggregation: see round_factor
_SLICE_PATTERN = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class SliceShape:
    """Shape ``out_channels x in_channels x kernel_size x kernel_size`` of one generated slice."""

    out_channels: int
    in_channels: int
    kernel_size: int

    def __post_init__(self) -> None:
        for name in ("out_channels", "in_channels", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"slice {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> SliceShape:
        """Parse ``"12x12x3x3"`` (out x in x k x k; square kernels only)."""
        match = _SLICE_PATTERN.match(str(text))
        if match is None:
            raise ValueError(
                f"slice shape {text!r} does not parse: expected OUTxINxKxK with positive "
                "integers, e.g. '12x12x3x3' or '16x16x1x1'"
            )
        s_out, s_in, k_h, k_w = (int(g) for g in match.groups())
        if k_h != k_w:
            raise ValueError(f"slice shape {text!r} has a non-square kernel {k_h}x{k_w}: only KxK is accepted")
        if min(s_out, s_in, k_h) <= 0:
            raise ValueError(f"slice shape {text!r} has a zero dimension: every dimension must be positive")
        return cls(s_out, s_in, k_h)

    @property
    def numel(self) -> int:
        return self.out_channels * self.in_channels * self.kernel_size**2

    @property
    def kernel_key(self) -> str:
        """Name of the generator for this kernel size in ``model.csg_generators``."""
        return f"{self.kernel_size}x{self.kernel_size}"

    def __str__(self) -> str:
        k = self.kernel_size
        return f"{self.out_channels}x{self.in_channels}x{k}x{k}"


@dataclass(frozen=True)
class SliceSpec:
    """One generator: the slice shape it produces and the dimension of its code vectors."""

    shape: SliceShape
    code_dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.code_dim, int) or isinstance(self.code_dim, bool) or self.code_dim <= 0:
            raise ValueError(f"code dim must be a positive integer, got {self.code_dim!r}")


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


@dataclass
class _Generation:
    """Weights of all layers of one generator, produced by one matmul.

    ``mode`` and ``generator`` identify the autograd mode, device, dtype and generator tensor
    (version counter and storage) it was made with; ``codes`` the same for each layer's codes.
    Layer i's weight depends only on the generator and layer i's codes, so checking those two is
    enough to know that it is current: O(1) per layer instead of O(layers).
    """

    mode: tuple
    generator: tuple[int, int]
    codes: list[tuple[int, int]]
    weights: list[Tensor]
    served: set[int] = field(default_factory=set)


class SliceGenerator(nn.Module):
    """The CSG: one bias-free linear map from a code vector to one filter slice.

    Parameters
    ----------
    shape
        The slice shape it generates.
    code_dim
        Dimension of the code vectors.
    frozen
        If True, the paper's random binary generator: Kaiming-normal weights turned into
        ``sign(W) * 0.5`` with ``requires_grad=False``, drawn on the CPU from ``seed`` so the same
        generator is rebuilt bit for bit on any machine.
    seed
        Seed of the weights. Always used for a frozen generator; for a trainable one, ``None``
        draws from torch's global RNG.
    """

    def __init__(self, shape: SliceShape, code_dim: int, *, frozen: bool = False, seed: int | None = None) -> None:
        super().__init__()
        if frozen and seed is None:
            raise ValueError("a frozen generator needs an explicit integer seed")
        self.shape = shape
        self.code_dim = code_dim
        self.frozen = frozen
        self.seed = seed
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        weight = torch.empty(shape.numel, code_dim)
        nn.init.kaiming_normal_(weight, generator=rng)
        if frozen:
            weight = torch.sign(weight) * 0.5
        self.weight = nn.Parameter(weight, requires_grad=not frozen)
        # Plain (unregistered) attributes: the layers are owned by the model, not by the generator.
        self.__dict__["_layers"] = []
        self.__dict__["_generation"] = None

    def __getstate__(self) -> dict:
        # Cached weights may be non-leaf tensors, which deepcopy and pickle refuse; they are
        # rebuilt on demand anyway.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_generation": None}

    @property
    def layers(self) -> list[CSGConv2d]:
        return self.__dict__["_layers"]

    def attach(self, layer: CSGConv2d) -> None:
        self.layers.append(layer)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Drop the cached weights (they are rebuilt on the next forward pass)."""
        self.__dict__["_generation"] = None

    def extra_repr(self) -> str:
        kind = "frozen binary" if self.frozen else "trainable"
        return f"slice={self.shape}, code_dim={self.code_dim}, {kind}, layers={len(self.layers)}"

    def forward(self, codes: Tensor) -> Tensor:
        """Generate slices: ``[N, code_dim] -> [N, S_out, S_in, k, k]``."""
        s = self.shape
        return F.linear(codes, self.weight).view(-1, s.out_channels, s.in_channels, s.kernel_size, s.kernel_size)

    def _mode(self) -> tuple:
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), self.weight.device, self.weight.dtype)

    def _generate(self, mode: tuple) -> _Generation:
        layers = self.layers
        codes = torch.cat([layer.codes for layer in layers]) if len(layers) > 1 else layers[0].codes
        slices = self(codes)
        parts = slices.split([layer.num_slices for layer in layers])
        weights = [layer.tile(part) for layer, part in zip(layers, parts, strict=True)]
        return _Generation(
            mode=mode,
            generator=_tensor_state(self.weight),
            codes=[_tensor_state(layer.codes) for layer in layers],
            weights=weights,
        )

    def weight_for(self, layer: CSGConv2d) -> Tensor:
        """Weight of ``layer``, generated together with every other layer of this generator.

        With autograd on, a generation is used once per layer: a second request from the same
        layer (a second forward pass) starts a new generation, so every pass has its own graph.
        With autograd off, the weights are reused until the layer's codes or the generator change
        (``optimizer.step()`` and ``load_state_dict`` bump the tensors' version counters).
        """
        index = layer.__dict__["_index"]
        mode = self._mode()
        generation: _Generation | None = self.__dict__["_generation"]
        grad = mode[0]
        if (
            generation is None
            or generation.mode != mode
            or generation.generator != _tensor_state(self.weight)
            or generation.codes[index] != _tensor_state(layer.codes)
            or (grad and index in generation.served)
        ):
            generation = self._generate(mode)
            self.__dict__["_generation"] = generation
        if grad:
            generation.served.add(index)
        return generation.weights[index]


def _tensor_state(tensor: Tensor) -> tuple[int, int]:
    return tensor._version, tensor.data_ptr()


class CSGConv2d(ComputedConv2d):
    """A conv layer whose weight is generated from its code vectors by a shared :class:`SliceGenerator`.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation
        As for :class:`torch.nn.Conv2d` (square kernels, ``groups=1``).
    generator
        The model's generator for this kernel size. It is referenced, not registered.
    bias
        Whether the conv has a bias (an ordinary parameter).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        generator: SliceGenerator,
        stride: int | tuple[int, int] = 1,
        padding: int | str | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation)
        shape = generator.shape
        if kernel_size != shape.kernel_size:
            raise ValueError(f"kernel size {kernel_size} does not match the generator's slice {shape}")
        self.blocks_out = math.ceil(out_channels / shape.out_channels)
        self.blocks_in = math.ceil(in_channels / shape.in_channels)
        codes = torch.empty(self.num_slices, generator.code_dim)
        nn.init.normal_(codes, mean=0.001, std=1.0)
        self.codes = nn.Parameter(codes)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.__dict__["generator"] = generator
        self.__dict__["_index"] = len(generator.layers)
        generator.attach(self)

    @property
    def num_slices(self) -> int:
        return self.blocks_out * self.blocks_in

    def tile(self, slices: Tensor) -> Tensor:
        """Tile ``[num_slices, S_out, S_in, k, k]`` slices into the ``[C_out, C_in, k, k]`` weight."""
        s = self.generator.shape
        k = s.kernel_size
        grid = slices.view(self.blocks_out, self.blocks_in, s.out_channels, s.in_channels, k, k)
        padded = grid.permute(0, 2, 1, 3, 4, 5).reshape(
            self.blocks_out * s.out_channels, self.blocks_in * s.in_channels, k, k
        )
        # Contiguous once per generation, so that cached weights are not copied again by every conv call.
        return padded[: self.out_channels, : self.in_channels].contiguous()

    @property
    def weight(self) -> Tensor:
        """The generated ``[C_out, C_in, k, k]`` filters."""
        return self.generator.weight_for(self)

    def weight_repr(self) -> str:
        return f"slices={self.num_slices}x{self.generator.code_dim}"


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
        If the model is already CSG-backed or has no eligible conv.
    """
    config = config or CSGConfig()
    if hasattr(model, GENERATORS_ATTR):
        raise ValueError("model is already CSG-backed (it has csg_generators)")
    specs = {spec.shape.kernel_size: spec for spec in config.slices}

    def no_slice(conv: nn.Conv2d) -> str | None:
        k = conv.kernel_size[0]
        return None if k in specs else f"no slice shape configured for {k}x{k} kernels"

    convs, plan = conversion_plan(model, config.skip, no_slice)
    report = report_of(plan, "CSG")
    targets = report.replaced
    if not targets:
        raise ValueError(
            f"model has no eligible conv for slice shapes {[str(s.shape) for s in config.slices]}: "
            f"needs an nn.Conv2d with groups=1 and a matching square kernel ({len(convs)} conv(s) found)"
        )
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
        layer = CSGConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            generator=generator,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
        )
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


def factor_keys(model: nn.Module) -> dict[str, list[str]]:
    """State-dict keys of the two CSG factors: ``{"generator": [...], "codes": [...]}`` (trainable
    generators only; a frozen generator is never trained nor sent)."""
    return {
        "generator": [f"{GENERATORS_ATTR}.{name}.weight" for name, g in generators(model).items() if not g.frozen],
        "codes": [f"{name}.codes" for name, _ in csg_layers(model)],
    }


def factor_lr_scales(model: nn.Module, codes: float, generator: float) -> dict[str, float]:
    """Parameter name -> lr factor for :func:`fedcsg.nn.training.make_optimizer`: ``codes`` for
    every CSG layer's codes, ``generator`` for every trainable generator (empty for a plain model)."""
    keys = factor_keys(model)
    return {**{k: generator for k in keys["generator"]}, **{k: codes for k in keys["codes"]}}


def round_factor(aggregation: str, server_round: int, trainable_generator: bool) -> str:
    """Which CSG factor the clients train in ``server_round`` (1-based).

    ``factors`` trains both every round (the server averages generator and codes separately,
    which is not averaging the generated filters: mean(G c) != mean(G) mean(c)). ``alternate``
    trains only the codes in odd rounds and only the generator in even rounds, so the filters are
    linear in what changed and every round's average is exact. A model without a trainable
    generator (fedavg, csg-frozen) has nothing to alternate: it trains ``all`` (its average is
    exact already).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"csg-aggregation {aggregation!r} is not accepted: one of {', '.join(AGGREGATIONS)} is")
    if aggregation == "factors" or not trainable_generator:
        return "all"
    return "codes" if server_round % 2 == 1 else "generator"


def frozen_keys(model: nn.Module, factor: str) -> list[str]:
    """State-dict keys that do not train when only ``factor`` (one of :data:`FACTORS`) does."""
    if factor not in FACTORS:
        raise ValueError(f"train factor {factor!r} is not accepted: one of {', '.join(FACTORS)} is")
    keys = factor_keys(model)
    return keys["generator"] if factor == "codes" else keys["codes"] if factor == "generator" else []


@contextmanager
def freeze_factor(model: nn.Module, factor: str) -> Iterator[None]:
    """Train only one CSG factor inside the block: ``"codes"`` freezes the generator(s),
    ``"generator"`` freezes the codes, ``"all"`` freezes nothing. Frozen tensors get
    ``requires_grad=False``, so an optimizer built inside the block leaves them out (no step, no
    weight decay, no momentum); the flags are restored on exit. Every other parameter trains."""
    params = dict(model.named_parameters())
    changed = [params[k] for k in frozen_keys(model, factor) if params[k].requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def csg_layers(model: nn.Module) -> Iterator[tuple[str, CSGConv2d]]:
    """The model's CSG convs with their qualified names."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, CSGConv2d))


def generators(model: nn.Module) -> dict[str, SliceGenerator]:
    """The model's generators by kernel key (empty for a plain model)."""
    found = getattr(model, GENERATORS_ATTR, None)
    return dict(found.items()) if found is not None else {}


def frozen_generator_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's frozen generators: drawn from the seed by every party, so never
    sent, stored in a compact file or averaged."""
    return {f"{GENERATORS_ATTR}.{name}.weight" for name, g in generators(model).items() if g.frozen}


def is_csg(model: nn.Module) -> bool:
    return bool(generators(model))


def clear_generated_cache(model: nn.Module) -> None:
    for generator in generators(model).values():
        generator.clear_cache()


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of a CSG model whose nn.Conv2d weights are the generated filters.

    The copy has no generator or codes; its outputs equal the CSG model's. Use it for inference
    on devices that should not carry the generator, or for export.
    """
    plain = copy.deepcopy(model)
    for name, layer in list(csg_layers(plain)):
        conv = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=layer.bias is not None,
        ).to(device=layer.codes.device, dtype=layer.codes.dtype)
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
        plain.set_submodule(name, conv)
    if hasattr(plain, GENERATORS_ATTR):
        delattr(plain, GENERATORS_ATTR)
    return plain
