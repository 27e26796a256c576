"""Peer methods: FedPara's parameterisation and the uplink codecs (fp16, int8, topk)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedcsg.fl.codecs import CODECS, Codec, encode_with_feedback
from fedcsg.nn.fedpara import FedParaConv2d, fedpara_rank, fedparafy
from fedcsg.nn.models import build_model

# -- FedPara ------------------------------------------------------------------------------------


def test_fedpara_rank_follows_the_papers_rule() -> None:
    # 64 -> 64, 3x3: r_min = 8; r_max = floor root of 9 r^2 + 128 r - 18432 = 38.7 -> 38
    assert fedpara_rank(64, 64, 3, 0.0) == 8
    assert fedpara_rank(64, 64, 3, 1.0) == 38
    assert fedpara_rank(64, 64, 3, 0.45) == math.ceil(0.55 * 8 + 0.45 * 38)  # 22
    # 16 -> 32: r_min = min(ceil(sqrt 32), 4) = 4; r_max: 9 r^2 + 48 r - 2304 -> 13.5 -> 13
    assert fedpara_rank(32, 16, 3, 0.45) == math.ceil(0.55 * 4 + 0.45 * 13)  # 9
    with pytest.raises(ValueError, match="fedpara-ratio 1.5 is outside"):
        fedpara_rank(64, 64, 3, 1.5)


def test_fedpara_resnet20_parameter_count_by_hand() -> None:
    model = build_model("resnet20")
    report = fedparafy(model, 0.45)
    assert len(report.replaced) == 18 and list(report.left) == ["conv1"]
    assert str(report).splitlines() == [
        "replaced 18 conv(s) with FedPara convs",
        "  left conv1: skipped by name (ordinary layer)",
    ]

    # By hand, ratio 0.45, 3x3 kernels: r = ceil(0.55 r_min + 0.45 r_max), r_max the floored root of
    # 9 r^2 + (O + I) r - 9 O I / 2:  16->16: r_min 4, r_max 9 -> 7;  16->32: 4, 13 -> 9;
    # 32->32: 6, 19 -> 12;  32->64: 6, 27 -> 16;  64->64: 8, 38 -> 22.
    def layer(o: int, i: int, r: int) -> int:
        return 2 * (r * r * 9 + r * (o + i))

    convs = (
        6 * [layer(16, 16, 7)]  # stage 1: six 16->16 convs
        + [layer(32, 16, 9)]  # first conv of stage 2
        + 5 * [layer(32, 32, 12)]
        + [layer(64, 32, 16)]  # first conv of stage 3
        + 5 * [layer(64, 64, 22)]
    )
    stem = 16 * 3 * 9
    batchnorm = 2 * (7 * 16 + 6 * 32 + 6 * 64)  # weight and bias of 19 BN layers
    classifier = 64 * 10 + 10
    expected = sum(convs) + stem + batchnorm + classifier
    assert expected == 112_800
    assert sum(p.numel() for p in model.parameters()) == expected
    ranks = {(m.out_channels, m.in_channels): m.rank for m in model.modules() if isinstance(m, FedParaConv2d)}
    assert ranks == {(16, 16): 7, (32, 16): 9, (32, 32): 12, (64, 32): 16, (64, 64): 22}
    assert all(
        layer(m.out_channels, m.in_channels, m.rank) == sum(p.numel() for p in m.parameters())
        for m in model.modules()
        if isinstance(m, FedParaConv2d)
    )


def test_fedpara_layer_is_a_hadamard_of_tucker_factors_at_kaiming_std() -> None:
    torch.manual_seed(0)
    layer = FedParaConv2d(32, 64, 3, rank=5, padding=1)
    w1 = torch.einsum("abhw,ao,bi->oihw", layer.t1, layer.x1, layer.y1)
    w2 = torch.einsum("abhw,ao,bi->oihw", layer.t2, layer.x2, layer.y2)
    torch.testing.assert_close(layer.weight, w1 * w2)
    assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=1e-4)
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, w1 * w2, None, 1, 1))
    # each factor's unfolding has rank 5, their Hadamard product rank 5^2 (the point of FedPara)
    assert torch.linalg.matrix_rank(w1.detach().reshape(64, -1)).item() == 5
    assert torch.linalg.matrix_rank(layer.weight.detach().reshape(64, -1)).item() == 25


def test_fedparafy_trains_and_reports_what_it_left() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    fedparafy(model, 0.45)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(("t1", "x2", "y1"))]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match=r"skip names \['nope'\] are not nn.Conv2d"):
        fedparafy(build_model("resnet20"), 0.45, skip={"nope"})


# -- codecs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_delta() -> tuple[np.ndarray, list[int]]:
    """A real update: ResNet-20's float payload after one SGD step minus before, flattened."""
    torch.manual_seed(0)
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    parts = [(v - before[k]).reshape(-1).double() for k, v in model.state_dict().items() if v.is_floating_point()]
    return torch.cat(parts).numpy(), [p.numel() for p in parts]


def test_fp16_round_trip_error_bound(real_delta) -> None:
    delta, segments = real_delta
    codec = Codec("fp16")
    encoded = codec.encode(delta, segments, np.random.default_rng(0))
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == codec.specs(delta.size, segments)
    decoded = codec.decode(encoded, delta.size, segments)
    assert np.all(np.abs(decoded - delta) <= np.abs(delta) * 2.0**-11 + 2.0**-25)
    assert encoded["fp16"].nbytes == 2 * delta.size


def test_int8_error_bound_and_unbiased_mean(real_delta) -> None:
    delta, segments = real_delta
    codec = Codec("int8")
    rng = np.random.default_rng(0)
    encoded = codec.encode(delta, segments, rng)
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == codec.specs(delta.size, segments)
    assert encoded["int8"].nbytes + encoded["scale"].nbytes == delta.size + 4 * len(segments)
    step = np.repeat(encoded["scale"].astype(np.float64), segments)
    decoded = codec.decode(encoded, delta.size, segments)
    assert np.all(np.abs(decoded - delta) <= step * (1 + 1e-6))
    # unbiased: the mean of many stochastic roundings approaches the delta (error ~ step / sqrt(n))
    small = delta[:2000]
    draws = np.mean([codec.decode(codec.encode(small, [2000], rng), 2000, [2000]) for _ in range(400)], axis=0)
    scale = np.abs(small).max() / 127
    assert np.abs(draws - small).max() < 4 * scale / math.sqrt(400) * 2
    assert abs(np.mean(draws - small)) < scale / 100
    # deterministic rounding would be biased on a value between two levels; stochastic is not
    constant = np.full(1000, 0.3, dtype=np.float64)
    constant[0] = 127.0  # scale 1.0: 0.3 sits between levels 0 and 1
    mean = np.mean([codec.decode(codec.encode(constant, [1000], rng), 1000, [1000])[1:].mean() for _ in range(200)])
    assert mean == pytest.approx(0.3, abs=0.01)


def test_topk_keeps_exactly_the_k_largest(real_delta) -> None:
    delta, segments = real_delta
    codec = Codec("topk", topk_fraction=0.01)
    encoded = codec.encode(delta, segments, np.random.default_rng(0))
    k = math.ceil(0.01 * delta.size)
    assert encoded["index"].shape == (k,) and encoded["index"].dtype == np.int32
    kept = set(encoded["index"].tolist())
    threshold = np.sort(np.abs(delta))[-k]
    assert np.all(np.abs(delta[list(kept)]) >= threshold)
    others = np.array([i for i in range(delta.size) if i not in kept])
    assert np.all(np.abs(delta[others]) <= threshold)
    decoded = codec.decode(encoded, delta.size, segments)
    assert np.count_nonzero(decoded) <= k
    np.testing.assert_allclose(decoded[encoded["index"]], delta[encoded["index"]], rtol=1e-6)


def test_error_feedback_carries_the_residual_to_the_next_round(real_delta) -> None:
    delta, segments = real_delta
    codec = Codec("topk", topk_fraction=0.05)
    rng = np.random.default_rng(0)
    first, residual = encode_with_feedback(codec, delta, segments, None, rng)
    np.testing.assert_allclose(residual + codec.decode(first, delta.size, segments), delta, atol=1e-12)
    second, residual2 = encode_with_feedback(codec, delta, segments, residual, rng)
    meant = delta + residual
    np.testing.assert_allclose(residual2 + codec.decode(second, delta.size, segments), meant, atol=1e-12)
    # over rounds nothing is lost: what was sent plus what is carried equals every delta meant
    sent = codec.decode(first, delta.size, segments) + codec.decode(second, delta.size, segments)
    np.testing.assert_allclose(sent + residual2, 2 * delta, atol=1e-12)
    # codecs without error feedback carry nothing
    assert encode_with_feedback(Codec("int8"), delta, segments, None, rng)[1] is None


def test_codec_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'int4': accepted are fp16, int8, topk"):
        Codec("int4")
    with pytest.raises(ValueError, match=r"topk-fraction 0.0 is outside \(0, 1\]"):
        Codec("topk", topk_fraction=0.0)
    codec = Codec("topk", topk_fraction=0.5)
    bad = {"index": np.array([3, 1], dtype=np.int32), "value": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="strictly increasing"):
        codec.decode(bad, 4, [4])
    assert set(CODECS) == {"fp16", "int8", "topk"}
