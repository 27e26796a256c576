"""The filter step of every round, measured on the server from the replies
(fedcsg.nn.step.round_step, fedcsg.fl.filter_step, the strategy, the records and the report)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedcsg.fl.filter_step import PayloadFilters
from fedcsg.fl.flower_private import offline_task_identity
from fedcsg.fl.strategy import CSGFedAvg
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.nn.csg import csg_layers
from fedcsg.nn.fedpara import FedParaConv2d
from fedcsg.nn.step import conv_filters, overall_change, relative_change, round_step
from fedcsg.runs.records import ArmRecorder, RoundRecord
from fedcsg.runs.report import write_report
from fedcsg.spec.codecs import Codec, TopK
from fedcsg.spec.config import RunConfig
from fedcsg.wire.messages import TEST_ACCURACY, TEST_LOSS, TrainInstruction
from fedcsg.wire.payload import PayloadLayout, model_payload
from fedcsg.wire.uplink import Uplink

from .test_reliability import ScriptedGrid

SMALL = {"model": "fmnist-cnn", "dataset": "fashion-mnist", "slice": "8x8x3x3", "code_dim": 32}


def test_round_step_exact_numbers() -> None:
    before = {"a": torch.tensor([3.0, 4.0])}
    after = {"a": torch.tensor([3.0, 5.0])}
    clients = [{"a": torch.tensor([3.0, 9.0])}, {"a": torch.tensor([6.0, 4.0])}]
    step = round_step(before, after, before, iter(clients))
    # global |(0, 1)| / 5; clients |(0, 5)| / 5 = 1 and |(3, 0)| / 5 = 3/5, mean 4/5
    assert (step.global_step, step.client_step, step.clients) == (pytest.approx(0.2), pytest.approx(0.8), 2)
    # A lossy downlink: the clients started from other filters than the server's.
    start = {"a": torch.tensor([3.0, 8.0])}  # |(0, 1)| / |(3, 8)| and |(3, -4)| / |(3, 8)|
    step = round_step(before, after, start, clients)
    assert step.client_step == pytest.approx((1 + 5) / 2 / 73**0.5, rel=1e-12)
    with pytest.raises(ValueError, match="^no client filters: a round's client step needs at least one reply$"):
        round_step(before, after, before, [])
    # A layer whose filters are all zero leaves the overall change defined: |(0, 1, 2)| / 5.
    zero = {"a": torch.tensor([3.0, 4.0]), "z": torch.zeros(1)}
    moved = {"a": torch.tensor([3.0, 5.0]), "z": torch.tensor([2.0])}
    assert overall_change(zero, moved) == pytest.approx(5**0.5 / 5, rel=1e-12)
    assert overall_change(before, after) == relative_change(before, after).overall
    with pytest.raises(ValueError, match="old filters are all zero"):
        overall_change({"z": torch.zeros(1)}, {"z": torch.ones(1)})


# -- hand-made replies through the strategy ---------------------------------------------------------


def _tiny() -> nn.Module:
    """Two 1x1 convs whose filters are [3, 4] and [0, 12] (norm 13 together), a bias and a linear layer
    that are not filters."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1), nn.Flatten(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.0, 12.0]).view(1, 2, 1, 1))
        model[1].bias.fill_(1.0)
        model[3].weight.fill_(1.0)
        model[3].bias.fill_(0.0)
    return model


# Client deltas, key -> added values: client 0 moves conv 0 by (0, 5) and the bias by 100, client 1
# moves conv 1 by (12, 0), conv 0 by (0, 1) and the linear layer by 5.
DELTAS = [
    {"0.weight": [0.0, 5.0], "1.bias": [100.0]},
    {"1.weight": [12.0, 0.0], "0.weight": [0.0, 1.0], "3.weight": [5.0]},
]


def _round(codec: Codec | None) -> RoundRecord:
    """One round of the strategy over an in-memory grid of two clients that reply with DELTAS added
    to the payload they received, encoded by ``codec``; the round's record."""
    model = _tiny()
    layout = PayloadLayout.for_model(model, "per-tensor")
    uplink = Uplink(layout, codec)

    def respond(position: int, node: int, message: Message) -> RecordDict:
        got = message.content["arrays"]
        local = {k: got[k].numpy().copy() for k in got}
        for key, values in DELTAS[position].items():
            local[key] = local[key] + np.array(values, np.float32).reshape(local[key].shape)
        reply, _ = uplink.encode(
            ArrayRecord({k: Array(v) for k, v in local.items()}), got, None, np.random.default_rng(0)
        )
        metrics = {"num-examples": 20, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 1.0}
        return RecordDict({"arrays": reply, "metrics": MetricRecord({**metrics, "partition-id": position})})

    strategy = CSGFedAvg(
        layout,
        lr_fn=lambda r: 0.1,
        uplink=uplink,
        payload_filters=PayloadFilters(model, layout),
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    offline_task_identity()
    strategy.start(
        grid=ScriptedGrid([7, 8], respond),
        initial_arrays=model_payload(model, layout),
        num_rounds=1,
        train_config=TrainInstruction(local_epochs=1, batch_size=16).record(),
    )
    return strategy.traffic[1]


def test_the_strategy_hands_each_evaluated_round_to_the_one_recorder() -> None:
    """The strategy composes a round's record (traffic, train metrics, lr, server evaluation) and
    hands it to the recorder, which adds the running totals: nobody else writes a RoundRecord."""
    model = _tiny()
    layout = PayloadLayout.for_model(model, "per-tensor")

    def respond(position: int, node: int, message: Message) -> RecordDict:
        metrics = {"num-examples": 20, "train-loss": 1.5, "train-accuracy": 0.5, "train-seconds": 1.0}
        return RecordDict(
            {"arrays": message.content["arrays"], "metrics": MetricRecord({**metrics, "partition-id": position})}
        )

    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1 * r, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    recorder = ArmRecorder(Path("never-written"), "fedavg", {})
    offline_task_identity()
    strategy.start(
        grid=ScriptedGrid([7, 8], respond),
        initial_arrays=model_payload(model, layout),
        num_rounds=2,
        train_config=TrainInstruction(local_epochs=1, batch_size=16).record(),
        evaluate_fn=lambda rnd, arrays: MetricRecord({TEST_ACCURACY: 0.25 + rnd / 10, TEST_LOSS: 2.0 - rnd / 10}),
        recorder=recorder,
    )
    initial, first, second = recorder.rounds
    assert (initial["round"], initial["status"], initial["lr"], initial["seconds"]) == (0, "initial", None, 0.0)
    assert (initial["test_accuracy"], initial["wire_up"], initial["cum_wire_up"]) == (0.25, 0, 0)
    for record, rnd in ((first, 1), (second, 2)):
        traffic = strategy.traffic[rnd]
        assert (record["round"], record["status"], record["replied"]) == (rnd, "ok", 2)
        assert record["test_accuracy"] == pytest.approx(0.25 + rnd / 10) and record["lr"] == pytest.approx(0.1 * rnd)
        assert (record["train_loss"], record["train_accuracy"]) == (1.5, 0.5)
        assert (record["wire_up"], record["payload_down"]) == (traffic.wire_up, traffic.payload_down) != (0, 0)
    assert second["cum_wire_up"] == first["wire_up"] + second["wire_up"]


def test_strategy_records_the_filter_step_of_hand_made_replies() -> None:
    record = _round(None)
    assert (record.status, record.replied, record.rejected) == ("ok", 2, 0)
    # Clients: |(0, 5)| / 13 and |(12, 0, 0, 1)| / 13 (the bias and the linear layer are no filters).
    assert record.client_filter_step == pytest.approx((5 + 145**0.5) / 2 / 13, rel=1e-12)
    # Global, equal weights: conv 0 moved by (0, 3), conv 1 by (6, 0): |(0, 3, 6, 0)| / 13.
    assert record.filter_step == pytest.approx(45**0.5 / 13, rel=1e-12)
    as_recorded = record.as_dict()
    assert (as_recorded["filter_step"], as_recorded["client_filter_step"]) == (
        record.filter_step,
        record.client_filter_step,
    )


def test_the_step_is_measured_on_the_decoded_replies_the_server_averages() -> None:
    """top-k with k = ceil(0.1 * 7) = 1 of the 7 floats: client 0's largest change is its bias (100),
    so the server gets none of its filter change; client 1's is conv 1's 12, without conv 0's 1 or
    the linear layer's 5."""
    record = _round(TopK(0.1))
    assert record.client_filter_step == pytest.approx((0 + 12 / 13) / 2, rel=1e-12)
    assert record.filter_step == pytest.approx(6 / 13, rel=1e-12)


def test_a_strategy_without_payload_filters_records_no_step() -> None:
    model = _tiny()
    layout = PayloadLayout.for_model(model, "per-tensor")
    assert CSGFedAvg(layout, lr_fn=lambda r: 0.1).payload_filters is None
    record = RoundRecord(1)
    assert (record.filter_step, record.client_filter_step) == (None, None)


# -- the arms' filters ---------------------------------------------------------------------------------


def test_payload_filters_are_the_generated_ones_and_fedparas_products() -> None:
    cfg = RunConfig(**SMALL, arm="csg-frozen")
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    filters = PayloadFilters(model, layout)
    sent = model_payload(model, layout)
    assert relative_change(conv_filters(model), filters(sent)).overall == 0.0
    # Codes twice as large (the frozen generator, never sent, is the seed's): every CSG layer's
    # generated filters double, the other convs stay.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [name for name, _ in csg_layers(model)]
    assert layers
    for name in layers:
        state[f"{name}.codes"] *= 2.0
    step = relative_change(filters(sent), filters(layout.pack(state)))
    assert step.per_layer == pytest.approx({n: 1.0 if n in layers else 0.0 for n in step.per_layer}, rel=1e-6)
    assert relative_change(conv_filters(model), conv_filters(filters.model)).overall > 0  # a copy was loaded
    assert relative_change(conv_filters(model), filters(sent)).overall == 0.0

    cfg = RunConfig(**SMALL, arm="fedpara")
    model = build_arm_model(cfg)
    fedpara = [name for name, m in model.named_modules() if isinstance(m, FedParaConv2d)]
    filters = PayloadFilters(model, payload_layout(cfg, model))(model_payload(model, payload_layout(cfg, model)))
    assert fedpara and set(fedpara) < set(filters)
    with torch.no_grad():
        for name in fedpara:
            assert torch.equal(filters[name], model.get_submodule(name).weight)


# -- records and report ----------------------------------------------------------------------------


def test_report_has_a_filter_step_table(tmp_path: Path) -> None:
    config = {**RunConfig(num_rounds=2).to_flower(), "arm": "csg"}
    for arm, steps in {"fedavg": [(0.1, 0.3), (0.2, 0.5)], "csg": [(0.4, 2.0), (0.2, 1.0)]}.items():
        recorder = ArmRecorder(tmp_path, arm, {**config, "arm": arm})
        recorder.add(RoundRecord(0, test_accuracy=0.1, test_loss=1.0, status="initial"), save=False)
        for rnd, (global_step, client_step) in enumerate(steps, start=1):
            record = RoundRecord(
                rnd, test_accuracy=0.2, test_loss=1.0, lr=0.05, seconds=1.0, wire_up=100, wire_down=100
            )
            record.filter_step, record.client_filter_step = global_step, client_step
            recorder.add(record, save=False)
        recorder.save()
    results = write_report(tmp_path)
    assert [r["filter_step"] for r in results["arms"]["csg"]["rounds"]] == [None, 0.4, 0.2]
    report = (tmp_path / "report.md").read_text()
    assert "## Filter step" in report
    assert "| fedavg | 0.2000 / 0.1500 | 0.5000 / 0.4000 | 2.67x |" in report
    assert "| csg | 0.2000 / 0.3000 | 1.0000 / 1.5000 | 5.00x |" in report
    with (tmp_path / "results.csv").open() as f:
        final = {r["arm"]: (r["filter_step"], r["client_filter_step"]) for r in csv.DictReader(f) if r["round"] == "2"}
    assert final == {"csg": ("0.2", "1.0"), "fedavg": ("0.2", "0.5")}


# -- a real run through Ray ----------------------------------------------------------------------------
