"""Parameter accounting: what a model holds and what a federated payload of it would carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from fedcsg.nn.csg import CSGConv2d, generators


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
