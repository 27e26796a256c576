"""Parameter accounting: what a model holds and what a federated payload of it would carry."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fedcsg.nn.csg import CSGConv2d, generators
from fedcsg.nn.csgify import CSGConfig, plan_csg


@dataclass(frozen=True)
class ParameterCounts:
    """Numbers of scalars in a model, by role.

    Attributes
    ----------
    total
        Every parameter, trainable or not (the paper's count).
    generator
        Generator weights (0 for a plain model).
    codes
        Code vectors of all CSG convs.
    other
        Every other parameter: the stem conv, BatchNorm affine weights, the classifier, and
        any conv left ordinary.
    buffers
        Buffer elements (BatchNorm running statistics and batch counters): not parameters, but a
        federated payload that carries them must count them.
    sendable
        Parameters that ever need sending: all of them except a frozen generator, which every
        party rebuilds from its seed.
    """

    total: int
    generator: int
    codes: int
    other: int
    buffers: int
    sendable: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count ``model``'s parameters by role (see :class:`ParameterCounts`)."""
    total = sum(p.numel() for p in model.parameters())
    gens = generators(model).values()
    generator = sum(g.weight.numel() for g in gens)
    frozen = sum(g.weight.numel() for g in gens if g.frozen)
    codes = sum(m.codes.numel() for m in model.modules() if isinstance(m, CSGConv2d))
    return ParameterCounts(
        total=total,
        generator=generator,
        codes=codes,
        other=total - generator - codes,
        buffers=sum(b.numel() for b in model.buffers()),
        sendable=total - frozen,
    )


MEMORY_SHARE = 4  # a model's weights may take at most 1/4 of physical memory: training holds grads, momentum, filters


def memory_limit() -> int:
    """The most bytes of weights one model may hold here: physical memory / :data:`MEMORY_SHARE`."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MEMORY_SHARE


def _meta_model(name: str, num_classes: int, in_channels: int) -> nn.Module | None:
    """The plain model on torch's meta device (no memory), or None when torch cannot even describe its size."""
    from fedcsg.nn.models import build_model

    try:
        with torch.device("meta"):
            return build_model(name, num_classes, in_channels)
    except RuntimeError:  # "Storage size calculation overflowed"
        return None


def planned_bytes(name: str, num_classes: int, in_channels: int, csg: CSGConfig | None, fedpara: bool) -> int:
    """Bytes of the weights and buffers (float32) that :func:`~fedcsg.nn.models.build_model` would make,
    found without allocating any: the plain model is built on torch's meta device, a CSG model adds
    its generators (slice numel x code dim each) and codes of at most code dim / slice numel of the
    plain filters; fedpara's factors are counted as twice the plain model. An upper bound."""
    plain = _meta_model(name, num_classes, in_channels)
    if plain is None:
        return 2**64
    numel = sum(t.numel() for t in (*plain.parameters(), *plain.buffers()))
    if csg is not None:
        numel += sum(s.shape.numel * s.code_dim for s in csg.slices)
        numel += numel * max(s.code_dim / s.shape.numel for s in csg.slices)
    if fedpara:
        numel *= 2
    return int(numel) * 4


def check_slices_fit(name: str, num_classes: int, in_channels: int, csg: CSGConfig) -> None:
    """Raise a one-line ValueError when a slice shape of ``csg`` is larger than every conv of model
    ``name`` with its kernel size (more output and more input channels than each): most of what its
    generator makes would be cut away in every layer (resnet20 with 128x128x3x3 asks a generator of
    1.2 billion weights for convs of at most 64x64), or when CSG can take none of its convs (each named,
    with the reason it stays ordinary)."""
    plain = _meta_model(name, num_classes, in_channels)
    convs = [m for m in (plain.modules() if plain is not None else []) if isinstance(m, nn.Conv2d) and m.groups == 1]
    for spec in csg.slices:
        k, shape = spec.shape.kernel_size, spec.shape
        sizes = [(c.out_channels, c.in_channels) for c in convs if c.kernel_size == (k, k)]
        if sizes and all(out < shape.out_channels and in_ < shape.in_channels for out, in_ in sizes):
            widest = max(sizes, key=lambda size: size[0] * size[1])
            raise ValueError(
                f"slice {shape} is larger than every {k}x{k} conv of {name} (the largest is "
                f"{widest[0]}x{widest[1]}x{k}x{k}): accepted is a slice no larger than some layer"
            )
    if plain is not None:
        try:
            plan_csg(plain, csg)
        except ValueError as error:
            raise ValueError(f"model = {name!r}: {error}") from None


MAX_PARAMETERS = 500_000_000  # of one model (2 GB of float32): a run holds one per client; resnet50 has 25.6 million


def check_model_size(planned: int, described: str) -> None:
    """Raise a one-line ValueError when ``planned`` bytes (:func:`planned_bytes`) exceed :func:`memory_limit`,
    or its parameters :data:`MAX_PARAMETERS`; ``described`` names the settings (e.g. ``resnet20 with
    in-channels = 10000000``)."""
    limit = memory_limit()
    if planned > limit:
        shown = f"{planned:,} bytes" if planned < 2**64 else "over 2**64 bytes"
        raise ValueError(
            f"{described} is not accepted: its weights would take {shown}, above this machine's limit of "
            f"{limit:,} (a quarter of its memory); accepted is a model that fits"
        )
    if planned // 4 > MAX_PARAMETERS:
        raise ValueError(
            f"{described} is not accepted: it would hold {planned // 4:,} parameters, above the bound of "
            f"{MAX_PARAMETERS:,} per model (a run holds one per client); accepted is a smaller model"
        )
