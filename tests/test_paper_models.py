"""The paper's large systems (issue 26): ImageNet ResNet-50 and DeepLabV3 counted by hand against the
registry's models, their conversion (3x3 convs only, geometry kept), shapes, `fedcsg params`, and the
refusal of a segmentation model for a run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from fedcsg.cli import main
from fedcsg.nn.csg import CSGConv2d, csg_layers
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.params import count_parameters
from fedcsg.spec.config import RunConfig

SLICE, CODE_DIM = 16, 128  # the paper's ImageNet / VOC setting: 16x16x3x3 slices, 128-dim codes
GENERATOR = SLICE * SLICE * 3 * 3 * CODE_DIM  # 294,912: one generator for every 3x3 conv


def conv(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    return c_out * c_in * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # affine weight and bias


def codes(c_in: int, c_out: int) -> int:
    """Codes of a CSG 3x3 conv: one 128-dim code per 16x16 block of its (padded) filter grid."""
    return math.ceil(c_out / SLICE) * math.ceil(c_in / SLICE) * CODE_DIM


class Count:
    """A running hand count: ``plain`` with stored filters, ``csg`` with 3x3 filters as codes."""

    def __init__(self) -> None:
        self.plain = self.csg = self.codes = self.conv3x3 = 0

    def ordinary(self, n: int) -> None:
        self.plain += n
        self.csg += n

    def conv3(self, c_in: int, c_out: int) -> None:
        self.plain += conv(c_in, c_out, 3)
        self.csg += codes(c_in, c_out)
        self.codes += codes(c_in, c_out)
        self.conv3x3 += 1


def bottleneck_backbone(blocks: tuple[int, ...]) -> Count:
    """He et al.'s bottleneck ResNet up to its last stage (7x7 stem, no FC), layer by layer."""
    count = Count()
    count.ordinary(conv(3, 64, 7) + bn(64))
    width_in = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        for i in range(n):
            count.ordinary(conv(width_in, width, 1) + bn(width))  # 1x1 reduction
            count.conv3(width, width)
            count.ordinary(bn(width))
            count.ordinary(conv(width, 4 * width, 1) + bn(4 * width))  # 1x1 expansion
            if i == 0:
                count.ordinary(conv(width_in, 4 * width, 1) + bn(4 * width))  # projection shortcut
            width_in = 4 * width
    return count


def resnet50_count(num_classes: int = 1000) -> Count:
    count = bottleneck_backbone((3, 4, 6, 3))
    count.ordinary(2048 * num_classes + num_classes)
    return count


def deeplabv3_count(blocks: tuple[int, ...], num_classes: int = 21) -> Count:
    """Backbone, ASPP (1x1, three atrous 3x3, pooling 1x1, 1x1 projection of 5 x 256) and head (3x3, 1x1)."""
    count = bottleneck_backbone(blocks)
    count.ordinary(conv(2048, 256, 1) + bn(256))
    for _ in range(3):
        count.conv3(2048, 256)
        count.ordinary(bn(256))
    count.ordinary(conv(2048, 256, 1) + bn(256))
    count.ordinary(conv(5 * 256, 256, 1) + bn(256))
    count.conv3(256, 256)
    count.ordinary(bn(256))
    count.ordinary(conv(256, num_classes, 1, bias=True))
    return count


# name -> (hand count, plain total, csg total, number of 3x3 convs)
CASES: dict[str, tuple[Callable[[], Count], int, int, int]] = {
    "resnet50": (resnet50_count, 25_557_032, 15_163_432, 16),
    "deeplabv3-resnet50": (lambda: deeplabv3_count((3, 4, 6, 3)), 39_638_869, 15_318_869, 20),
    "deeplabv3-resnet101": (lambda: deeplabv3_count((3, 4, 23, 3)), 58_630_997, 24_841_045, 37),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    name = request.param
    num_classes = 1000 if name == "resnet50" else 21
    torch.manual_seed(0)
    plain = build_model(name, num_classes)
    return name, plain, build_model(name, num_classes, csg=default_csg_config(name))


def test_counts_match_the_hand_count(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, plain, csg = pair
    hand, plain_total, csg_total, conv3x3 = CASES[name]
    count = hand()
    assert (count.plain, count.csg + GENERATOR, count.conv3x3) == (plain_total, csg_total, conv3x3)
    assert count_parameters(plain).total == plain_total
    counts = count_parameters(csg)
    assert counts.total == csg_total
    assert counts.generator == GENERATOR
    assert counts.codes == count.codes
    assert counts.sendable == csg_total


def test_paper_figures() -> None:
    # Paper, ImageNet ResNet-50: 25.56M -> 15.16M; DeepLabV3: "about 2.3x" (the paper names no backbone).
    assert (round(25_557_032 / 1e6, 2), round(15_163_432 / 1e6, 2)) == (25.56, 15.16)
    assert round(39_638_869 / 15_318_869, 2) == 2.59
    assert round(58_630_997 / 24_841_045, 2) == 2.36


def test_only_3x3_convs_converted_with_their_geometry(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, plain, csg = pair
    plain_convs = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
    replaced = dict(csg_layers(csg))
    assert len(replaced) == CASES[name][3]
    assert set(replaced) == {n for n, m in plain_convs.items() if m.kernel_size == (3, 3)}
    for n, layer in replaced.items():
        before = plain_convs[n]
        assert isinstance(layer, CSGConv2d) and layer.generator.shape.numel == SLICE * SLICE * 9
        geometry = (layer.in_channels, layer.out_channels, layer.stride, layer.padding, layer.dilation)
        assert geometry == (before.in_channels, before.out_channels, before.stride, before.padding, before.dilation)
    left = {n: m for n, m in csg.named_modules() if type(m) is nn.Conv2d}
    assert {m.kernel_size for m in left.values()} == {(7, 7), (1, 1)}
    if name.startswith("deeplabv3"):
        # Atrous convs keep their rates: the dilated backbone (output stride 8) and ASPP's 12 / 24 / 36.
        assert {replaced[f"classifier.0.convs.{i}.0"].dilation for i in (1, 2, 3)} == {(12, 12), (24, 24), (36, 36)}
        assert replaced["backbone.layer4.0.conv2"].dilation == (2, 2)
        assert replaced["backbone.layer4.2.conv2"].dilation == (4, 4)


def test_forward_shape_matches_plain(pair: tuple[str, nn.Module, nn.Module]) -> None:
    name, plain, csg = pair
    x = torch.randn(1, 3, 64, 64)
    plain.eval(), csg.eval()  # batch 1: ASPP's pooling branch has one value per channel
    with torch.no_grad():
        out_plain, out_csg = plain(x), csg(x)
    if name == "resnet50":
        assert out_plain.shape == out_csg.shape == (1, 1000)
    else:
        assert set(out_csg) == {"out"}
        assert out_plain["out"].shape == out_csg["out"].shape == (1, 21, 64, 64)
        assert torch.isfinite(out_csg["out"]).all()


def test_resnet50_takes_the_data_sets_classes_and_channels() -> None:
    model = build_model("resnet50", 10, 1, csg=default_csg_config("resnet50"))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert model.conv1.in_channels == 1 and type(model.conv1) is nn.Conv2d
    assert count_parameters(model).total == resnet50_count(10).csg + GENERATOR - conv(3, 64, 7) + conv(1, 64, 7)


def test_params_command_prints_resnet50(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--model", "resnet50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["plain"]["total"], result["csg"]["total"]) == (25_557_032, 15_163_432)
    assert result["slices"] == [{"shape": "16x16x3x3", "code_dim": 128}]
    assert main(["params", "--model", "deeplabv3-resnet50"]) == 0
    out = capsys.readouterr().out
    assert "39,638,869" in out and "15,318,869" in out and "reduction (total): 2.59x" in out


def test_segmentation_model_refused_for_a_run(tmp_path: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    with pytest.raises(ValueError, match="model = 'deeplabv3-resnet50' is not accepted for a run"):
        RunConfig(model="deeplabv3-resnet50")
    code, out, err = cli("run", "--set", "model=deeplabv3-resnet101", "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "model = 'deeplabv3-resnet101' is not accepted for a run: it is a segmentation model" in lines[0]
    assert "resnet50" in lines[0] and not (tmp_path / "out").exists()
    assert RunConfig(model="resnet50").model == "resnet50"  # the ImageNet classifier is trainable
