"""Convolutional Slice Generator (CSG) layers: the generator, the conv it feeds, and the queries on a CSG model.

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

:func:`fedcsg.nn.csgify.csgify` installs these layers in a model (and sets their initial scale);
:mod:`fedcsg.nn.csg_factors` says which of the two factors, generator and codes, trains when.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcsg.nn.convert import ComputedConv2d, ConvGeometry

GENERATORS_ATTR = "csg_generators"
_SLICE_PATTERN = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$", re.ASCII)


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
                f"slice shape {str(text)[:40]!r} does not parse: expected OUTxINxKxK with positive "
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

    ``geometry`` is the conv it replaces; ``generator`` is the model's generator for this kernel
    size, referenced, not registered.
    """

    def __init__(self, geometry: ConvGeometry, generator: SliceGenerator) -> None:
        super().__init__(geometry)
        shape = generator.shape
        if geometry.kernel_size != shape.kernel_size:
            raise ValueError(f"kernel size {geometry.kernel_size} does not match the generator's slice {shape}")
        self.blocks_out = math.ceil(geometry.out_channels / shape.out_channels)
        self.blocks_in = math.ceil(geometry.in_channels / shape.in_channels)
        codes = torch.empty(self.num_slices, generator.code_dim)
        nn.init.normal_(codes, mean=0.001, std=1.0)
        self.codes = nn.Parameter(codes)
        self.add_bias()
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
        # Laid out once per generation, so that cached weights are not copied again by every conv call.
        return padded[: self.out_channels, : self.in_channels].contiguous(memory_format=self.memory_format)

    def generate(self) -> Tensor:
        """This layer's filters generated on their own: no cache, no state, one graph under
        ``torch.compile`` (the same products as its rows of the shared generation)."""
        return self.tile(self.generator(self.codes))

    @property
    def weight(self) -> Tensor:
        """The generated ``[C_out, C_in, k, k]`` filters: from the generator's shared generation when
        eager, from :meth:`generate` while ``torch.compile`` traces (its cache checks tensor versions
        and storage, which a graph cannot)."""
        if torch.compiler.is_compiling():
            return self.generate()
        return self.generator.weight_for(self)

    def weight_repr(self) -> str:
        return f"slices={self.num_slices}x{self.generator.code_dim}"


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
