"""How far a training step moves a model's filters (issue 25): the relative change
``|W_new - W_old| / |W_old|`` (Frobenius norms) of the conv filters, per layer and over all of them.

For a CSG layer the filters are the generated ones, so a CSG model and the plain model built from
its generated filters (:func:`fedcsg.nn.csgify.materialize`) are measured on the same footing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedcsg.nn.csg import CSGConv2d, clear_generated_cache


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
    """Layer name -> a detached copy of its conv filters (generated ones for CSG layers), every
    :class:`torch.nn.Conv2d` and :class:`fedcsg.nn.csg.CSGConv2d` of ``model``."""
    clear_generated_cache(model)
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | CSGConv2d)
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
