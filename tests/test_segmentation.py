"""Segmentation pieces without Flower (issue 26): mean IoU on hand-made predictions, the ignore label,
the small DeepLabV3's shapes and its CSG conversion (dilation and stride kept), one training step."""

from __future__ import annotations

import pytest
import torch

from fedcsg.nn.csg import CSGConv2d, SliceShape, SliceSpec
from fedcsg.nn.csgify import CSGConfig, csgify
from fedcsg.nn.segmentation import (
    IGNORE_LABEL,
    confusion_matrix,
    mean_iou,
    seg_evaluate,
    seg_train_epoch,
    small_deeplabv3,
)
from fedcsg.nn.training import make_optimizer


def test_mean_iou_on_hand_made_predictions() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_LABEL, IGNORE_LABEL]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    confusion = confusion_matrix(prediction, target, 4)
    # Counted pixels (ignore dropped): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0).
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in ((0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0)):
        expected[t, p] += 1
    assert torch.equal(confusion, expected)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 0 -> 2/3;
    # class 2: TP 1, FP 0, FN 1 -> 1/2; class 3 occurs nowhere and is not averaged.
    assert mean_iou(confusion) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    assert mean_iou(confusion_matrix(target, target, 4)) == 1.0
    assert mean_iou(torch.zeros(4, 4, dtype=torch.int64)) == 0.0


def test_confusion_matrix_refuses_bad_classes_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^target holds classes outside 0\.\.2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="differs from target shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_small_deeplabv3_shapes_and_csg_keeps_dilation() -> None:
    torch.manual_seed(0)
    model = small_deeplabv3(11, 1)
    plain = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    report = csgify(model, CSGConfig(slices=(SliceSpec(SliceShape(8, 8, 3), 32),)))
    # Every 3x3 conv but the stem: 12 in the backbone, 3 ASPP branches, the head's 3x3.
    assert len(report.replaced) == 16
    assert {n for n, m in plain.items() if m.kernel_size == (3, 3)} - set(report.replaced) == {"backbone.0"}
    layers = dict(model.named_modules())
    for name in report.replaced:
        assert isinstance(layers[name], CSGConv2d)
        assert (layers[name].stride, layers[name].padding, layers[name].dilation) == (
            plain[name].stride,
            plain[name].padding,
            plain[name].dilation,
        )
    assert layers["classifier.0.convs.3.0"].dilation == (6, 6)
    assert layers["backbone.8.conv1"].dilation == (2, 2)
    x = torch.randn(2, 1, 56, 56)
    assert model(x).shape == (2, 11, 56, 56)


def test_segmentation_loops_ignore_label_and_report_miou() -> None:
    torch.manual_seed(0)
    model = small_deeplabv3(3, 1, widths=(8, 8, 8), aspp_channels=8)
    x = torch.randn(4, 1, 16, 16)
    y = torch.randint(0, 3, (4, 16, 16))
    y[:, :4] = IGNORE_LABEL
    batches = [(x[:2], y[:2]), (x[2:], y[2:]), (x[:1], y[:1])]  # a 1-image batch is skipped in training
    stats = seg_train_epoch(model, batches, make_optimizer(model, 0.01), "cpu", 3)
    assert stats.num_examples == 4 and 0.0 <= stats.accuracy <= 1.0 and stats.loss > 0
    evaluated = seg_evaluate(model, [(x, y)], "cpu", 3)
    with torch.no_grad():
        prediction = model(x).argmax(1)
    assert evaluated.num_examples == 4
    assert evaluated.accuracy == pytest.approx(mean_iou(confusion_matrix(prediction, y, 3)), abs=1e-12)


def test_small_deeplabv3_counts_match_the_hand_count() -> None:
    def conv3(c_in: int, c_out: int) -> tuple[int, int]:
        """(plain weight, CSG codes) of a 3x3 conv under 8x8x3x3 / 32 slices."""
        return c_in * c_out * 9, -(-c_in // 8) * -(-c_out // 8) * 32

    bn = lambda c: 2 * c  # noqa: E731
    threes = [(16, 16)] * 4 + [(16, 32)] + [(32, 32)] * 3 + [(32, 64)] + [(64, 64)] * 3  # backbone blocks
    threes += [(64, 64)] * 3 + [(64, 64)]  # ASPP's atrous branches, the head's 3x3
    ordinary = 1 * 16 * 9 + bn(16)  # stem
    ordinary += bn(16) * 4 + bn(32) * 4 + bn(64) * 4  # block BNs
    ordinary += 16 * 32 + bn(32) + 32 * 64 + bn(64)  # the two 1x1 projection shortcuts
    ordinary += (64 * 64 + bn(64)) * 2 + 5 * 64 * 64 + bn(64)  # ASPP 1x1 branch, pooling branch, projection
    ordinary += bn(64) * 3 + bn(64) + 64 * 11 + 11  # ASPP branch BNs, head BN, classifier
    plain = ordinary + sum(conv3(*c)[0] for c in threes)
    csg = ordinary + sum(conv3(*c)[1] for c in threes) + 8 * 8 * 9 * 32
    model = small_deeplabv3(11, 1)
    assert sum(p.numel() for p in model.parameters()) == plain == 352_059
    csgify(model, CSGConfig(slices=(SliceSpec(SliceShape(8, 8, 3), 32),)))
    assert sum(p.numel() for p in model.parameters()) == csg == 70_203
