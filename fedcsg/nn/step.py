"""How far a training step moves a model's filters: the relative change
``|W_new - W_old| / |W_old|`` (Frobenius norms) of the conv filters, per layer and over all of them.

For a CSG layer the filters are the generated ones and for a FedPara layer its low-rank product
(every :class:`~fedcsg.nn.convert.ComputedConv2d`), so a CSG model, a FedPara model and the plain model
built from its filters (:func:`fedcsg.nn.csgify.materialize`) are measured on the same footing.

:func:`round_step` is what a federated round records (:class:`fedcsg.runs.records.RoundRecord`): the
global filters' change over the round and the mean change of a client's filters in its local training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedcsg.nn.convert import ComputedConv2d
from fedcsg.nn.csg import clear_generated_cache


@dataclass(frozen=True)
class FilterStep:
    """Relative filter change between two sets of filters.

    Attributes
    ----------
    overall : float
        ``sqrt(sum_l |dW_l|^2) / sqrt(sum_l |W_l|^2)`` over every layer.
    per_layer : dict
        Layer name -> ``|dW_l| / |W_l|``, in the order of the old filters.
    """

    overall: float
    per_layer: dict[str, float]


@torch.no_grad()
def conv_filters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> a detached copy of its conv filters, every :class:`torch.nn.Conv2d` and
    :class:`~fedcsg.nn.convert.ComputedConv2d` of ``model`` (generated filters for CSG layers,
    the product of the factors for FedPara layers)."""
    clear_generated_cache(model)
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | ComputedConv2d)
    }


def relative_change(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> FilterStep:
    """The relative change from ``old`` to ``new`` filters (name -> tensor, same names and shapes).

    Raises
    ------
    ValueError
        If the names or a shape differ, there is no filter, or a layer's old filters are all zero.
    """
    if set(old) != set(new):
        raise ValueError(f"filters differ in names: {sorted(set(old) ^ set(new))} are in one set only")
    if not old:
        raise ValueError("no filters to compare: at least one conv layer is needed")
    per_layer, moved, norm = {}, 0.0, 0.0
    for name, before in old.items():
        after = new[name]
        if before.shape != after.shape:
            raise ValueError(f"filters {name!r} changed shape: {tuple(before.shape)} -> {tuple(after.shape)}")
        base = before.double().norm().item()
        if base == 0:
            raise ValueError(f"filters {name!r} are all zero: a relative change needs nonzero old filters")
        delta = (after.double() - before.double()).norm().item()
        per_layer[name] = delta / base
        moved += delta**2
        norm += base**2
    return FilterStep(math.sqrt(moved) / math.sqrt(norm), per_layer)


def overall_change(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """:attr:`FilterStep.overall` of :func:`relative_change` alone, which a layer whose old filters
    are all zero does not make undefined (only all of them being zero does).

    Raises
    ------
    ValueError
        If the names or a shape differ, or every old filter is zero.
    """
    if set(old) != set(new):
        raise ValueError(f"filters differ in names: {sorted(set(old) ^ set(new))} are in one set only")
    moved, norm = 0.0, 0.0
    for name, before in old.items():
        after = new[name]
        if before.shape != after.shape:
            raise ValueError(f"filters {name!r} changed shape: {tuple(before.shape)} -> {tuple(after.shape)}")
        moved += (after.double() - before.double()).norm().item() ** 2
        norm += before.double().norm().item() ** 2
    if norm == 0:
        raise ValueError("the old filters are all zero (or there are none): a relative change needs nonzero ones")
    return math.sqrt(moved) / math.sqrt(norm)


@dataclass(frozen=True)
class RoundStep:
    """How far one federated round moved the filters.

    Attributes
    ----------
    global_step : float
        :func:`overall_change` from the global filters before the round to those after it.
    client_step : float
        The mean over the round's clients (unweighted) of :func:`overall_change` from
        the filters a client started from to its filters after local training.
    clients : int
        How many clients the mean is over.
    """

    global_step: float
    client_step: float
    clients: int


def round_step(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    clients: Iterable[Mapping[str, torch.Tensor]],
) -> RoundStep:
    """The :class:`RoundStep` of a round: the global filters ``before`` and ``after`` it, the filters
    the clients ``start`` from (``before`` unless a lossy downlink sent them an approximation) and
    each client's filters after local training (an iterable, consumed one at a time).

    Raises
    ------
    ValueError
        If there is no client, or as :func:`overall_change` does.
    """
    steps = [overall_change(start, filters) for filters in clients]
    if not steps:
        raise ValueError("no client filters: a round's client step needs at least one reply")
    return RoundStep(overall_change(before, after), math.fsum(steps) / len(steps), len(steps))
