"""Issue 25: the relative filter change of a step, fedcsg.nn.step."""

from __future__ import annotations

import pytest
import torch

from fedcsg.nn.csg import csg_layers
from fedcsg.nn.csgify import materialize
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.step import conv_filters, relative_change


def test_relative_change_exact_numbers() -> None:
    old = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([0.0, 0.0, 12.0])}
    new = {"a": torch.tensor([[3.0, 5.0]]), "b": torch.tensor([3.0, 4.0, 12.0])}
    step = relative_change(old, new)
    # a: |(0, 1)| / |(3, 4)| = 1/5; b: |(3, 4, 0)| / 12 = 5/12; overall sqrt(1 + 25) / sqrt(25 + 144)
    assert step.per_layer == pytest.approx({"a": 0.2, "b": 5 / 12}, rel=1e-12)
    assert step.overall == pytest.approx(26**0.5 / 13, rel=1e-12)
    assert relative_change(old, old).overall == 0.0


def test_relative_change_rejects_bad_input_in_one_line() -> None:
    a = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match=r"^filters differ in names: \['b'\]"):
        relative_change(a, {"a": torch.ones(2), "b": torch.ones(1)})
    with pytest.raises(ValueError, match="changed shape: \\(2,\\) -> \\(3,\\)"):
        relative_change(a, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="all zero"):
        relative_change({"a": torch.zeros(2)}, a)
    with pytest.raises(ValueError, match="no filters"):
        relative_change({}, {})


def test_conv_filters_are_the_generated_ones_and_match_the_plain_copy() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", csg=default_csg_config("resnet20"))
    filters = conv_filters(model)
    layers = dict(csg_layers(model))
    assert len(layers) == 18 and set(layers) <= set(filters)
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(filters[name], layer.weight)
    plain = conv_filters(materialize(model))
    assert list(plain) == list(filters)
    assert relative_change(filters, plain).overall == 0.0
    with torch.no_grad():
        next(iter(layers.values())).codes.mul_(2.0)
    assert relative_change(filters, conv_filters(model)).per_layer[next(iter(layers))] == pytest.approx(1.0, rel=1e-6)
