"""The CSG generator, layer, converter and materializer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fedcsg.nn.convert import ConvGeometry
from fedcsg.nn.csg import CSGConv2d, SliceGenerator, SliceShape, SliceSpec, csg_layers, generators
from fedcsg.nn.csgify import CSGConfig, csgify, materialize


def _config(shape: str = "4x3x3x3", code_dim: int = 5, **kwargs) -> CSGConfig:
    return CSGConfig(slices=(SliceSpec(SliceShape.parse(shape), code_dim),), **kwargs)


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 10, 3, stride=2, padding=2, dilation=2, bias=True)
        self.depthwise = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.point = nn.Conv2d(10, 7, 1)
        self.bn = nn.BatchNorm2d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.point(self.depthwise(self.body(self.stem(x)))))


def test_slice_shape_parse_and_errors() -> None:
    shape = SliceShape.parse("12x12x3x3")
    assert (shape.out_channels, shape.in_channels, shape.kernel_size, shape.numel) == (12, 12, 3, 1296)
    assert str(shape) == "12x12x3x3"
    for bad in ("12x12", "12x12x3x5", "0x12x3x3", "axbxcxd", ""):
        with pytest.raises(ValueError, match="slice shape"):
            SliceShape.parse(bad)
    with pytest.raises(ValueError, match="code dim must be a positive integer, got 0"):
        SliceSpec(shape, 0)


def test_tiling_element_by_element() -> None:
    """Element [o, c, y, x] of the weight is element [o % S_out, c % S_in, y, x] of slice
    (o // S_out) * n_in + c // S_in, for a layer whose channels are not multiples of the slice."""
    torch.manual_seed(0)
    generator = SliceGenerator(SliceShape(4, 3, 3), code_dim=5, seed=1)
    layer = CSGConv2d(ConvGeometry(7, 10, 3), generator)  # C_in=7, C_out=10: padded to 9 and 12
    assert (layer.blocks_out, layer.blocks_in, layer.num_slices) == (3, 3, 9)
    assert layer.codes.shape == (9, 5)
    slices = (layer.codes @ generator.weight.T).view(9, 4, 3, 3, 3)
    weight = layer.weight
    assert weight.shape == (10, 7, 3, 3)
    for o in range(10):
        for c in range(7):
            expected = slices[(o // 4) * 3 + c // 3, o % 4, c % 3]
            torch.testing.assert_close(weight[o, c], expected, rtol=0, atol=1e-6)


def test_layer_matches_conv2d_with_generated_weight() -> None:
    torch.manual_seed(0)
    model = TwoConv()
    csgify(model, _config())
    x = torch.randn(2, 3, 9, 9)
    body = model.body
    assert isinstance(body, CSGConv2d)
    expected = nn.functional.conv2d(model.stem(x), body.weight, body.bias, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(body(model.stem(x)), expected)


def test_initialisation_statistics() -> None:
    torch.manual_seed(0)
    generator = SliceGenerator(SliceShape(12, 12, 3), code_dim=72, seed=0)
    layer = CSGConv2d(ConvGeometry(600, 600, 3), generator)
    assert abs(layer.codes.mean().item() - 0.001) < 0.01
    assert abs(layer.codes.std().item() - 1.0) < 0.01
    # Kaiming normal (fan_in = code_dim): std sqrt(2 / 72)
    assert abs(generator.weight.std().item() - (2 / 72) ** 0.5) < 0.005


def test_gradients_reach_generator_and_codes() -> None:
    torch.manual_seed(0)
    model = TwoConv()
    csgify(model, _config())
    model(torch.randn(2, 3, 9, 9)).square().mean().backward()
    generator = generators(model)["3x3"]
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert model.body.codes.grad is not None and model.body.codes.grad.abs().sum() > 0


def test_frozen_generator_gets_no_gradient_and_is_binary() -> None:
    torch.manual_seed(0)
    model = TwoConv()
    csgify(model, _config(frozen=True, seed=7))
    generator = generators(model)["3x3"]
    assert not generator.weight.requires_grad
    assert set(generator.weight.unique().tolist()) <= {-0.5, 0.5}
    model(torch.randn(2, 3, 9, 9)).square().mean().backward()
    assert generator.weight.grad is None
    assert model.body.codes.grad is not None


def test_frozen_generator_rebuilt_from_seed_bitwise() -> None:
    a = SliceGenerator(SliceShape(12, 12, 3), 72, frozen=True, seed=1234)
    torch.manual_seed(99)  # the global RNG must not matter
    b = SliceGenerator(SliceShape(12, 12, 3), 72, frozen=True, seed=1234)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, SliceGenerator(SliceShape(12, 12, 3), 72, frozen=True, seed=1235).weight)
    # ... and in a fresh interpreter, as another machine would.
    code = (
        "import torch, hashlib; from fedcsg.nn.csg import SliceGenerator, SliceShape;"
        "w = SliceGenerator(SliceShape(12, 12, 3), 72, frozen=True, seed=1234).weight;"
        "print(hashlib.sha256(w.detach().numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert out == hashlib.sha256(a.weight.detach().numpy().tobytes()).hexdigest()
    with pytest.raises(ValueError, match="explicit integer seed"):
        SliceGenerator(SliceShape(12, 12, 3), 72, frozen=True, seed=None)


def test_generator_registered_once() -> None:
    from fedcsg.nn.models import build_model, default_csg_config

    model = build_model("resnet20", csg=default_csg_config("resnet20"))
    gen_keys = [k for k in model.state_dict() if "csg_generators" in k]
    assert gen_keys == ["csg_generators.3x3.weight"]
    assert [n for n, _ in model.named_parameters() if n.endswith("3x3.weight")] == ["csg_generators.3x3.weight"]
    assert len(list(csg_layers(model))) == 18
    # No layer registers the generator, or a generated filter, under itself: the only conv weight
    # stored is the stem's.
    layer_names = {name for name, _ in csg_layers(model)}
    assert not [k for k in model.state_dict() if k.rpartition(".")[0] in layer_names and not k.endswith(".codes")]
    assert [k for k in model.state_dict() if k.endswith("conv1.weight")] == ["conv1.weight"]


def test_one_matmul_per_generator_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcsg.nn.models import build_model, default_csg_config

    model = build_model("resnet20", csg=default_csg_config("resnet20"))
    generator = generators(model)["3x3"]
    calls = []
    original = SliceGenerator.forward
    monkeypatch.setattr(
        SliceGenerator, "forward", lambda self, codes: calls.append(codes.shape) or original(self, codes)
    )
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [(273, 72)]
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # a second pass gets its own graph
    assert len(calls) == 2
    assert generator is generators(model)["3x3"]


def test_eval_cache_reused_and_dropped_when_parameters_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcsg.nn.models import build_model, default_csg_config

    torch.manual_seed(0)
    model = build_model("resnet20", csg=default_csg_config("resnet20")).eval()
    calls = []
    original = SliceGenerator.forward
    monkeypatch.setattr(SliceGenerator, "forward", lambda self, codes: calls.append(1) or original(self, codes))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        model(x)
    assert len(calls) == 1  # cached while nothing changed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = model(x)
    assert len(calls) == 3  # the training pass, then a fresh generation after the step
    assert not torch.allclose(first, after_step)
    # load_state_dict changes parameters in place: the cache must be dropped too.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.0.conv1.codes"] += 1.0
    model.load_state_dict(state)
    with torch.no_grad():
        reloaded = model(x)
    assert len(calls) == 4
    assert not torch.allclose(after_step, reloaded)


def test_csgify_report_and_skips() -> None:
    model = TwoConv()
    report = csgify(model, _config())
    assert report.replaced == ["body"]
    assert set(report.left) == {"stem", "depthwise", "point"}
    assert "skipped by name" in report.left["stem"]
    assert "groups=10" in report.left["depthwise"]
    assert "no slice shape configured for 1x1" in report.left["point"]
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.bn, nn.BatchNorm2d)


def test_csgify_pointwise_and_explicit_skip() -> None:
    model = TwoConv()
    config = CSGConfig(slices=(SliceSpec(SliceShape(4, 3, 3), 5), SliceSpec(SliceShape(4, 4, 1), 3)), skip=("body",))
    report = csgify(model, config)
    assert report.replaced == ["stem", "point"]
    assert set(generators(model)) == {"3x3", "1x1"}
    with pytest.raises(ValueError, match="already CSG-backed"):
        csgify(model, config)
    with pytest.raises(ValueError, match=r"skip names \['nope'\]"):
        csgify(TwoConv(), _config(skip=("nope",)))


def test_csgify_without_eligible_conv() -> None:
    from fedcsg.nn.imported_models import Holder

    model = Holder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 5), nn.Linear(4, 2)))
    with pytest.raises(ValueError) as error:
        csgify(model, _config())
    slices = ", ".join(str(s.shape) for s in _config().slices)
    assert str(error.value) == (
        f"the model has no conv that CSG can take for slice shapes {slices} (an nn.Conv2d with groups=1, zero padding "
        "and a square kernel of a configured size, not the stem): body.0: skipped by name (ordinary layer); "
        "body.1: no slice shape configured for 5x5 kernels"
    )


def test_materialize_matches_outputs() -> None:
    torch.manual_seed(0)
    model = TwoConv()
    csgify(model, _config())
    model.eval()
    plain = materialize(model)
    assert not list(csg_layers(plain)) and not generators(plain)
    assert isinstance(plain.body, nn.Conv2d)
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max().item() <= 1e-5
    # The CSG model is left intact.
    assert isinstance(model.body, CSGConv2d)


def test_deepcopy_after_forward() -> None:
    import copy

    model = TwoConv()
    csgify(model, _config())
    model(torch.randn(1, 3, 9, 9))  # leaves a cached generation with a graph
    clone = copy.deepcopy(model)
    assert clone.body.generator is generators(clone)["3x3"]
    assert clone.body.generator is not model.body.generator
    with torch.no_grad():
        x = torch.randn(1, 3, 9, 9)
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))
