"""Peer methods: FedPara's parameterisation, the uplink codecs (fp16, int8, topk), the arms that
combine them (MODEL[+CODEC]) and how encoded updates travel, are checked and are counted."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedcsg.fl.server_app import build_strategy
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.fl.traffic import accounted_wire_bytes, arm_traffic, payload_bytes, round_messages, train_replies
from fedcsg.nn.convert import ConvGeometry
from fedcsg.nn.fedpara import FedParaConv2d, fedpara_rank, fedparafy
from fedcsg.nn.models import build_model
from fedcsg.runs.plots import _style, plot_accuracy
from fedcsg.runs.winner import fewest_bytes_sentence
from fedcsg.spec.arms import MODELS, PHASED, Arm, all_arms, arm_order, check_arm
from fedcsg.spec.codecs import (
    CODECS,
    ArraySpecs,
    Codec,
    Fp16,
    Int8,
    LineStyle,
    TopK,
    codec_type,
    encode_with_feedback,
    register_codec,
)
from fedcsg.spec.config import RunConfig
from fedcsg.wire import uplink as uplink_module
from fedcsg.wire.downlink import Downlink
from fedcsg.wire.messages import TrainInstruction
from fedcsg.wire.payload import Framing, model_payload, weighted_average
from fedcsg.wire.uplink import Uplink

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
    layer = FedParaConv2d(ConvGeometry(32, 64, 3, padding=1), rank=5)
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
    codec = Fp16()
    encoded = codec.encode(delta, segments, np.random.default_rng(0))
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == codec.specs(delta.size, segments)
    decoded = codec.decode(encoded, delta.size, segments)
    assert np.all(np.abs(decoded - delta) <= np.abs(delta) * 2.0**-11 + 2.0**-25)
    assert encoded["fp16"].nbytes == 2 * delta.size


def test_int8_error_bound_and_unbiased_mean(real_delta) -> None:
    delta, segments = real_delta
    codec = Int8()
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
    codec = TopK(0.01)
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
    codec = TopK(0.05)
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
    assert encode_with_feedback(Int8(), delta, segments, None, rng)[1] is None


def test_codec_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=f"unknown codec 'int4': accepted are {', '.join(CODECS)}"):
        codec_type("int4")
    with pytest.raises(ValueError, match=r"topk-fraction = 0.0 is not accepted: a number in \(0, 1\] is"):
        TopK(0.0)
    codec = TopK(0.5)
    bad = {"index": np.array([3, 1], dtype=np.int32), "value": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="strictly increasing"):
        codec.decode(bad, 4, [4])


@pytest.mark.parametrize("name", list(CODECS))
def test_every_registered_codec_keeps_the_contract(name: str, real_delta) -> None:
    delta, segments = real_delta
    codec = codec_type(name).of_run(RunConfig(topk_fraction=0.05))
    assert codec.name == name and Arm.parse(f"csg+{name}").codec == name
    encoded = codec.encode(delta, segments, np.random.default_rng(0))
    assert {k: (v.shape, str(v.dtype)) for k, v in encoded.items()} == codec.specs(delta.size, segments)
    sent, residual = encode_with_feedback(codec, delta, segments, None, np.random.default_rng(0))
    decoded = codec.decode(sent, delta.size, segments)
    assert decoded.shape == delta.shape and decoded.dtype == np.float64 and np.isfinite(decoded).all()
    if codec.error_feedback:  # what is carried is exactly what was not sent
        np.testing.assert_allclose(residual + decoded, delta, atol=1e-12)
    else:
        assert residual is None


@dataclass(frozen=True)
class Sign(Codec):
    """The walk-through of adding a codec (1 bit a value and a float32 scale a segment, the mean
    magnitude, with error feedback): this class, registered, is all a new codec is."""

    name: ClassVar[str] = "sign"
    linestyle: ClassVar[LineStyle] = (0, (5, 1))
    error_feedback: ClassVar[bool] = True

    def specs(self, size: int, segments: Sequence[int]) -> ArraySpecs:
        return {"bits": (((size + 7) // 8,), "uint8"), "scale": ((len(segments),), "float32")}

    def _encode(self, delta: np.ndarray, segments: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        parts = np.split(delta, np.cumsum(segments)[:-1])
        scale = np.array([np.abs(part).mean() if part.size else 0.0 for part in parts], dtype=np.float32)
        return {"bits": np.packbits(delta >= 0), "scale": scale}

    def decode(self, arrays: dict[str, np.ndarray], size: int, segments: Sequence[int]) -> np.ndarray:
        signs = np.unpackbits(arrays["bits"], count=size).astype(np.float64) * 2 - 1
        return signs * np.repeat(arrays["scale"].astype(np.float64), segments)


@pytest.fixture
def sign() -> Iterator[type[Codec]]:
    """The ``sign`` codec registered for one test."""
    yield register_codec(Sign)
    del CODECS["sign"]


def test_a_registered_codec_is_an_arm_counted_and_plotted(sign: type[Codec], tmp_path: Path) -> None:
    assert list(CODECS) == ["fp16", "int8", "topk", "sign"]
    # the arm grammar, RunConfig and `fedcsg bytes`' arms
    assert check_arm("csg+sign/int8") == "csg+sign/int8" and "fedavg+sign" in all_arms()
    assert arm_order(["csg+sign", "csg", "csg+topk"]) == ["csg", "csg+topk", "csg+sign"]
    with pytest.raises(ValueError, match="UPCODEC one of fp16, int8, topk, sign and"):
        check_arm("csg+sgn")
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm="csg+sign", min_train_nodes=1)
    assert cfg.codec == Sign()
    # its bytes: a bit a float and 4 bytes a tensor, with the int64 BatchNorm counters as they are
    layout = payload_layout(cfg, build_arm_model(cfg))
    counters = len(layout.entries) - len(layout.segments)
    size = sum(layout.segments)
    assert arm_traffic(cfg, 2)["payload_up"] == 2 * ((size + 7) // 8 + 4 * len(layout.segments) + 8 * counters)
    # a client's reply is decoded, checked and averaged by the server as any codec's
    sent = model_payload(build_arm_model(cfg), layout)
    local = _moved(sent, layout.floating_keys(), 1e-2, seed=1)
    reply, residual = Uplink(layout, cfg.codec).encode(local, sent, None, np.random.default_rng(0))
    strategy, aggregated, _ = _strategy_round(cfg, [reply], [10])
    assert strategy.traffic[1].rejected == 0
    uplink = Uplink(layout, cfg.codec)
    moved = uplink.flat_floats(local) - uplink.flat_floats(sent)
    np.testing.assert_allclose(uplink.flat_floats(aggregated) - uplink.flat_floats(sent) + residual, moved, atol=1e-6)
    # the report's plots: its own line style, and the plot is drawn
    assert _style("csg+sign") == {"color": "C2", "linestyle": (0, (5, 1)), "marker": "o"}
    rounds = [{"round": r, "cum_wire_up": r * 10, "cum_wire_down": r * 10, "test_accuracy": 0.1 * r} for r in (0, 1)]
    plot_accuracy({0: {"arms": {"csg+sign": {"rounds": rounds}}}}, ["csg+sign"], "sign", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_bytes.png", "accuracy_vs_round.png"]


def test_a_codec_needs_a_name_and_a_line_style_of_its_own() -> None:
    with pytest.raises(ValueError, match=r"codec 'int8' is registered already \(Int8\)"):
        register_codec(type("Again", (Int8,), {}))
    with pytest.raises(ValueError, match=r"codec 'sign': line style ':' is int8's"):
        register_codec(type("Dotted", (Sign,), {"linestyle": ":"}))
    with pytest.raises(ValueError, match=r"codec 'sign': line style '-' is the arms without a codec's"):
        register_codec(type("Solid", (Sign,), {"linestyle": "-"}))
    assert list(CODECS) == ["fp16", "int8", "topk"]


# -- arms ---------------------------------------------------------------------------------------


def test_arm_names_model_plus_codec() -> None:
    assert Arm.parse("csg+int8") == Arm("csg", "int8") and Arm("csg", "int8").name == "csg+int8"
    assert check_arm("csg-frozen+topk") == "csg-frozen+topk" and check_arm("fedpara") == "fedpara"
    assert len(all_arms()) == (len(MODELS) - len(PHASED)) * (1 + len(CODECS))
    assert all_arms()[:2] == ["fedavg", "fedavg+fp16"]
    assert arm_order(["csg+int8", "old-arm", "csg", "fedavg+topk", "fedavg"]) == [
        "fedavg",
        "fedavg+topk",
        "csg",
        "csg+int8",
        "old-arm",
    ]
    for bad in ("csg+int4", "fedprox", "csg+", "+int8", "csg+int8+topk"):
        with pytest.raises(ValueError) as error:
            check_arm(bad)
        assert str(error.value) == (
            f"unknown arm {bad!r}: accepted are MODEL[+UPCODEC][/DOWNLINK] with MODEL one of fedavg, fedpara, csg, "
            f"csg-frozen, csg-warm, UPCODEC one of {', '.join(CODECS)} and DOWNLINK one of full, fp16, int8, "
            "delta-int8, delta-topk (e.g. csg+int8/int8, fedavg/delta-int8)"
        )
    with pytest.raises(ValueError, match="unknown arm 'csg\\+int4'"):
        RunConfig(arms="fedavg,csg+int4")
    # The codec changes the traffic, never the model
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm="csg+int8")
    assert cfg.model_settings().arm == "csg" and cfg.codec == Int8()
    assert RunConfig(arm="csg").codec is None


def test_bad_arm_on_the_command_line_is_one_line_exit_2(cli) -> None:
    code, out, err = cli("compare", "--arms", "fedavg,csg+int9")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "fedcsg compare: error: unknown arm 'csg+int9': accepted are MODEL[+UPCODEC][/DOWNLINK] with MODEL one of "
        f"fedavg, fedpara, csg, csg-frozen, csg-warm, UPCODEC one of {', '.join(CODECS)} and DOWNLINK one of full, "
        "fp16, int8, delta-int8, delta-topk (e.g. csg+int8/int8, fedavg/delta-int8)"
    ]


def test_fedpara_arm_payload_is_within_10_percent_of_csg() -> None:
    sizes = {}
    for arm in ("fedpara", "csg"):
        cfg = RunConfig(model="resnet20", arm=arm)
        sizes[arm] = payload_layout(cfg, build_arm_model(cfg)).nbytes
    assert abs(sizes["fedpara"] / sizes["csg"] - 1) < 0.10, sizes
    assert sizes["fedpara"] == (112_800 + 2 * (16 * 7 + 32 * 6 + 64 * 6)) * 4 + 19 * 8  # + BN statistics, counters


# -- encoded updates on real payloads -----------------------------------------------------------


def _moved(record: ArrayRecord, floating: list[str], scale: float, seed: int) -> ArrayRecord:
    """``record`` with its float arrays moved by seeded normal noise (a stand-in for local training)."""
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            k: Array((a.numpy() + rng.normal(0, scale, a.shape)).astype(a.numpy().dtype)) if k in floating else a
            for k, a in record.items()
        }
    )


@pytest.mark.parametrize("packing", ["flat", "per-tensor"])
@pytest.mark.parametrize("codec", list(CODECS))
def test_uplink_round_trip_on_a_real_payload(codec: str, packing: str) -> None:
    cfg = RunConfig(model="resnet20", arm=f"csg+{codec}", payload_packing=packing, topk_fraction=0.1)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    sent = model_payload(model, layout)
    local = _moved(sent, layout.floating_keys(), 1e-2, seed=1)
    uplink = Uplink(layout, cfg.codec)
    reply, residual = uplink.encode(local, sent, None, np.random.default_rng(0))
    assert {k: (tuple(a.shape), a.dtype) for k, a in reply.items()} == uplink.specs()
    decoded = uplink.decode(reply, sent)
    assert {k: (tuple(a.shape), a.dtype) for k, a in decoded.items()} == layout.array_specs()
    error = uplink.flat_floats(decoded) - uplink.flat_floats(local)
    delta = uplink.flat_floats(local) - uplink.flat_floats(sent)
    for key in set(layout.array_specs()) - set(layout.floating_keys()):  # BN counters pass unchanged
        np.testing.assert_array_equal(decoded[key].numpy(), local[key].numpy())
    if codec == "fp16":
        rounding = np.abs(uplink.flat_floats(sent)) * 2.0**-23  # adding the delta back in float32
        assert np.all(np.abs(error) <= np.abs(delta) * 2.0**-11 + 2.0**-24 + rounding)
    elif codec == "int8":
        step = np.repeat(reply["delta.scale"].numpy().astype(np.float64), layout.segments)
        assert np.all(np.abs(error) <= step * (1 + 1e-5) + np.abs(uplink.flat_floats(sent)) * 2.0**-23)
        counters = len(layout.entries) - len(layout.segments)  # int64 BatchNorm counters, sent as they are
        assert payload_bytes(reply) == delta.size + 4 * len(layout.segments) + 8 * counters
    elif codec == "topk":
        k = math.ceil(0.1 * delta.size)
        assert reply["delta.index"].shape == (k,)
        kept = np.abs(delta)[reply["delta.index"].numpy()]
        assert kept.min() >= np.partition(np.abs(delta), -k)[-k] - 1e-12  # exactly the k largest
        np.testing.assert_allclose(residual + uplink.flat_floats(decoded) - uplink.flat_floats(sent), delta, atol=1e-6)


def test_fp16_downlink_is_restored_to_the_layouts_dtypes() -> None:
    cfg = RunConfig(model="resnet20", arm="csg")
    layout = payload_layout(cfg, build_arm_model(cfg))
    arrays = model_payload(build_arm_model(cfg), layout)
    sent = Downlink(layout, "fp16").encode(arrays)
    assert sent["float32"].dtype == "float16" and sent["int64"].dtype == "int64"
    assert payload_bytes(sent) == payload_bytes(arrays) - 2 * sent["float32"].shape[0]
    back = Downlink(layout, "fp16").decode(sent)
    np.testing.assert_array_equal(back["float32"].numpy(), arrays["float32"].numpy().astype(np.float16))
    assert Downlink(layout).encode(arrays) is arrays


def test_uplink_and_downlink_frame_a_payload_alike() -> None:
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm="csg+int8")
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    up, down = Uplink(layout, cfg.codec).specs(), Downlink(layout, "int8", block=0).compressed_specs()
    size, segments = sum(layout.segments), len(layout.segments)
    assert up == {"int64": ((4,), "int64"), "delta.int8": ((size,), "int8"), "delta.scale": ((segments,), "float32")}
    assert down == {"int64": ((4,), "int64"), "down.int8": ((size,), "int8"), "down.scale": ((segments,), "float32")}
    framing = Framing(layout, "down.")
    parts = {"int8": np.ones(size, dtype=np.int8), "scale": np.ones(segments, dtype=np.float32)}
    message = framing.pack(model_payload(model, layout), parts)
    back = framing.unpack(message, {k: ((a.size,), str(a.dtype)) for k, a in parts.items()})
    assert {k: a.tolist() for k, a in back.items()} == {k: a.tolist() for k, a in parts.items()}
    with pytest.raises(ValueError, match=r"payload entry 'down.scale' is float32\[23\], expected float32\[24\]"):
        framing.unpack(message, {"int8": ((size,), "int8"), "scale": ((segments + 1,), "float32")})


def _strategy_round(cfg: RunConfig, replies_of: list[ArrayRecord], examples: list[int]):
    """Aggregate ``replies_of`` as round 1 of ``cfg``'s strategy, the clients having been sent its
    initial payload; returns (strategy, aggregated arrays, the global payload as received)."""
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    strategy = build_strategy(cfg, layout, model)
    arrays = model_payload(model, layout)
    strategy.server_arrays, strategy.global_arrays = arrays, strategy.broadcaster.prepare(arrays)
    strategy._round_traffic(1)
    aggregated, _ = strategy.aggregate_train(1, train_replies(replies_of, examples))
    return strategy, aggregated, strategy.global_arrays


@pytest.mark.parametrize("arm", ["fedavg+int8", "fedpara+fp16", "csg+topk", "csg-frozen+int8"])
def test_server_averages_decoded_updates_exactly(arm: str) -> None:
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm=arm, downlink="fp16")
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    fp16 = Downlink(layout, "fp16")
    sent = fp16.decode(fp16.encode(model_payload(model, layout)))
    uplink = Uplink(layout, cfg.codec)
    rng = np.random.default_rng(0)
    locals_ = [_moved(sent, layout.floating_keys(), 1e-2, seed=i) for i in range(3)]
    encoded = [uplink.encode(local, sent, None, rng)[0] for local in locals_]
    strategy, aggregated, reference = _strategy_round(cfg, encoded, [10, 20, 30])
    assert strategy.traffic[1].rejected == 0
    exact = weighted_average([uplink.decode(r, reference) for r in encoded], [10, 20, 30])
    # The server's own float32 model moves by the exact average update (decoded against the fp16
    # model the clients received); the integer counters are the average's.
    full = model_payload(model, layout)
    moved = uplink.flat_floats(full) + uplink.flat_floats(exact) - uplink.flat_floats(reference)
    np.testing.assert_array_equal(uplink.flat_floats(aggregated), moved.astype(np.float32))
    assert not np.array_equal(uplink.flat_floats(aggregated), uplink.flat_floats(exact))  # not the fp16 base
    for key in set(exact) - set(layout.floating_keys()):
        np.testing.assert_array_equal(aggregated[key].numpy(), exact[key].numpy())
    assert strategy.traffic[1].payload_up == sum(payload_bytes(r) for r in encoded)


def _with(record: ArrayRecord, key: str, values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({**{k: a for k, a in record.items()}, key: Array(values)})


def test_decoded_bad_replies_are_rejected() -> None:
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", arm="csg+topk", topk_fraction=0.1, min_train_nodes=1)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    sent = model_payload(model, layout)
    uplink = Uplink(layout, cfg.codec)
    good, _ = uplink.encode(_moved(sent, layout.floating_keys(), 1e-2, 0), sent, None, np.random.default_rng(0))
    index, value = good["delta.index"].numpy(), good["delta.value"].numpy()
    int8_cfg = cfg.replace(arm="csg+int8")
    int8_good, _ = Uplink(layout, int8_cfg.codec).encode(
        _moved(sent, layout.floating_keys(), 1e-2, 0), sent, None, np.random.default_rng(0)
    )
    bad = {
        "index out of range": _with(good, "delta.index", np.concatenate([index[:-1], [10**8]]).astype(np.int32)),
        "index repeated": _with(good, "delta.index", np.concatenate([index[:1], index[:-1]]).astype(np.int32)),
        "value NaN": _with(good, "delta.value", np.where(np.arange(value.size) == 3, np.nan, value).astype(np.float32)),
        "value as float64": _with(good, "delta.value", value.astype(np.float64)),
        "plain payload": sent,
    }
    for name, record in bad.items():
        strategy, aggregated, _ = _strategy_round(cfg, [record], [10])
        assert aggregated is None and strategy.traffic[1].rejected == 1, name
    strategy, aggregated, _ = _strategy_round(cfg, [good], [10])
    assert aggregated is not None and strategy.traffic[1].rejected == 0
    scale = int8_good["delta.scale"].numpy().copy()
    scale[0] = np.inf
    strategy, aggregated, _ = _strategy_round(int8_cfg, [_with(int8_good, "delta.scale", scale)], [10])
    assert aggregated is None and strategy.traffic[1].rejected == 1


@pytest.mark.parametrize("arm", ["fedavg+int8", "csg+fp16", "csg-frozen+topk", "fedpara"])
def test_encoded_message_bytes_are_the_arrays_plus_flowers_framing(arm: str) -> None:
    """The reply counted on the wire is the encoded arrays (at their real size) plus Flower's framing,
    and the framing is what the same message costs with the arrays emptied."""
    cfg = RunConfig(model="resnet20", arm=arm)
    down, up = round_messages(cfg)
    arrays = up.content["arrays"]
    assert payload_bytes(arrays) == sum(a.numpy().nbytes for a in arrays.values())
    empty = ArrayRecord({k: Array(a.numpy()[:0]) for k, a in arrays.items()})
    framing = accounted_wire_bytes(
        Message(RecordDict({k: empty if k == "arrays" else v for k, v in up.content.items()}), reply_to=down)
    )
    assert accounted_wire_bytes(up) - payload_bytes(arrays) - framing in range(0, 8 * len(arrays) + 1)
    traffic = arm_traffic(cfg, 10)
    assert traffic["payload_up"] == 10 * payload_bytes(arrays) and traffic["wire_up"] == 10 * accounted_wire_bytes(up)


def test_client_carries_the_topk_residual_in_its_context(data_env, monkeypatch) -> None:
    """The ClientApp itself: round 1 stores the part it did not send in Context.state, round 2
    hands exactly that residual to the codec (and keeps the new one)."""
    from fedcsg.fl import client_app

    cfg = RunConfig(
        model="fmnist-cnn", dataset="fashion-mnist", arm="csg+topk", train_limit=128, num_clients=2, batch_size=32
    )
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    sent = model_payload(model, layout)
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), cfg.to_flower())
    seen: list[np.ndarray | None] = []
    real = uplink_module.encode_with_feedback

    def spy(codec, delta, segments, residual, rng):
        seen.append(None if residual is None else residual.copy())
        return real(codec, delta, segments, residual, rng)

    monkeypatch.setattr(uplink_module, "encode_with_feedback", spy)
    residuals = []
    for server_round in (1, 2):
        config = TrainInstruction(cfg.local_epochs, cfg.batch_size, server_round=server_round, lr=0.05).record()
        down = Message(RecordDict({"arrays": sent, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
        reply = client_app.train(down, context)
        assert set(reply.content["arrays"]) == set(Uplink(layout, cfg.codec).specs())
        residuals.append(client_app.carried_residual(context, client_app.residual_key(cfg, layout)).copy())
    assert seen[0] is None and np.linalg.norm(residuals[0]) > 0
    np.testing.assert_array_equal(seen[1], residuals[0])
    assert not np.array_equal(residuals[1], residuals[0])
    # The same node serves the next run of the simulation (another seed): it starts without a residual.
    config = TrainInstruction(cfg.local_epochs, cfg.batch_size, server_round=1, lr=0.05, arm=cfg.arm, seed=1).record()
    client_app.train(
        Message(RecordDict({"arrays": sent, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN), context
    )
    assert seen[2] is None and client_app.residual_key(cfg.replace(seed=1), layout) in context.state


def test_report_names_the_arm_with_the_fewest_bytes() -> None:
    sentence = fewest_bytes_sentence({"fedavg": 100e6, "csg+int8": 10e6, "fedpara": 20e6, "csg": None}, "the goal")
    assert sentence == (
        "Fewest wire bytes to the goal: **csg+int8**, 10.000 MB (10.00x fewer than fedavg); next fedpara, "
        "20.000 MB (2.00x more); not reached by csg."
    )
    assert fewest_bytes_sentence({"fedavg": None}, "the goal") == "No arm reached the goal."


def test_report_counts_bytes_to_the_target_and_to_fedavg_minus_one_point() -> None:
    from fedcsg.runs.summary import summarize

    def rounds(accuracies: list[float], up: int, down: int) -> list[dict]:
        out = [{"round": 0, "test_accuracy": 0.1, "cum_wire_up": 0, "cum_wire_down": 0}]
        for i, acc in enumerate(accuracies, start=1):
            out.append(
                {
                    "round": i,
                    "test_accuracy": acc,
                    "payload_up": up,
                    "payload_down": down,
                    "wire_up": up,
                    "wire_down": down,
                    "cum_wire_up": up * i,
                    "cum_wire_down": down * i,
                    "cum_payload_up": up * i,
                    "cum_payload_down": down * i,
                    "seconds": 1.0,
                }
            )
        return out

    results = {
        "config": {"target-accuracy": 0.3},
        "arms": {
            "fedavg": {"rounds": rounds([0.2, 0.35, 0.5], 100, 100)},
            "csg+int8": {"rounds": rounds([0.25, 0.3, 0.495], 10, 40)},
            "fedpara": {"rounds": rounds([0.2, 0.28, 0.45], 40, 40)},
        },
    }
    summary = summarize(results["config"], {0: results})
    assert summary["fedavg"].match_accuracy.values == (pytest.approx(0.49),)
    # fedavg reaches 0.3 at round 2 (400 bytes) and 0.49 at round 3 (600)
    assert (summary["fedavg"].wire_bytes_to_target.values, summary["fedavg"].wire_bytes_to_match.values) == (
        (400,),
        (600,),
    )
    assert (summary["csg+int8"].wire_bytes_to_target.values, summary["csg+int8"].round_to_match.values) == (
        (100,),
        (3,),
    )
    assert summary["csg+int8"].wire_bytes_to_match.values == (150,)
    assert summary["fedpara"].wire_bytes_to_match.values == (None,) and summary["fedpara"].round_to_target.values == (
        3,
    )
    assert summary["csg+int8"].total_ratio_vs_fedavg == pytest.approx(600 / 150)
