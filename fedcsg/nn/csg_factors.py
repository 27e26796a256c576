"""The two factors of a CSG model, generator and codes: their state-dict keys, their learning-rate
scales, and which of them one round of local training updates (:func:`round_factor`, :func:`freeze_factor`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from fedcsg.nn.csg import GENERATORS_ATTR, csg_layers, generators

FACTORS = ("all", "codes", "generator")  # what one round of local training may update (see freeze_factor)
AGGREGATIONS = ("factors", "alternate")  # csg-aggregation: see round_factor


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


def round_factor(aggregation: str, server_round: int, trainable_generator: bool, frozen_after: int = 0) -> str:
    """Which CSG factor the clients train in ``server_round`` (1-based).

    ``factors`` trains both every round (the server averages generator and codes separately,
    which is not averaging the generated filters: mean(G c) != mean(G) mean(c)). ``alternate``
    trains only the codes in odd rounds and only the generator in even rounds, so the filters are
    linear in what changed and every round's average is exact. A model without a trainable
    generator (fedavg, csg-frozen) has nothing to alternate: it trains ``all`` (its average is
    exact already). With ``frozen_after`` = K > 0 the generator freezes after round K: from round K+1
    only the codes train (arm ``csg-warm``).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"csg-aggregation {aggregation!r} is not accepted: one of {', '.join(AGGREGATIONS)} is")
    if trainable_generator and 0 < frozen_after < server_round:
        return "codes"
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
