"""Downlinks per arm (fedcsg.wire.downlink): the arm grammar, the blockwise int8 broadcast, and the delta
downlinks' x̂ (bit-for-bit agreement, resync in full, loud failures, checkpoints), all in-process: the
strategy's round loop over an in-memory grid whose nodes run the client's downlink code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedcsg.fl.client_app import train
from fedcsg.fl.flower_private import offline_task_identity
from fedcsg.fl.server_app import build_strategy
from fedcsg.fl.strategy import CSGFedAvg
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.fl.traffic import accounted_wire_bytes, payload_bytes, round_messages
from fedcsg.runs.checkpoint import load_checkpoint, save_checkpoint
from fedcsg.runs.records import RoundRecord
from fedcsg.spec.arms import Arm, arm_of_stem, check_arm, file_stem, two_way_arms
from fedcsg.spec.codecs import block_lengths
from fedcsg.spec.config import RunConfig
from fedcsg.wire.downlink import (
    BLOCK,
    STATE_HELD,
    STATE_MODEL,
    Downlink,
    DownlinkOutOfSync,
    model_hash,
    receive,
    state_keys,
)
from fedcsg.wire.messages import CONFIG, DOWNLINK_VERSION, TrainInstruction, TrainReply
from fedcsg.wire.payload import flat_floats, model_payload
from fedcsg.wire.uplink import Uplink

from .test_reliability import RUN_INSTRUCTION, ScriptedGrid

SMALL = {"model": "fmnist-cnn", "dataset": "fashion-mnist"}


# -- grammar ----------------------------------------------------------------------------------------


def test_arm_grammar_accepts_a_downlink_per_arm_and_refuses_the_rest() -> None:
    assert Arm.parse("csg+int8/int8") == Arm("csg", "int8", "int8")
    assert Arm.parse("fedavg/delta-int8") == Arm("fedavg", "", "delta-int8")
    assert check_arm("csg-frozen+topk/delta-topk") == "csg-frozen+topk/delta-topk"
    assert check_arm("fedavg/full") == "fedavg/full" and check_arm("csg+int8") == "csg+int8"
    for bad in ("csg+int8/int4", "csg/", "csg+int8/int8/int8", "csg/int8+int8", "fedavg+full/int8"):
        with pytest.raises(ValueError) as error:
            check_arm(bad)
        assert str(error.value).startswith(f"unknown arm {bad!r}: accepted are MODEL[+UPCODEC][/DOWNLINK]")
        assert "DOWNLINK one of full, fp16, int8, delta-int8, delta-topk" in str(error.value)
    # An arm that names no downlink gets the run-wide one; one that names it keeps its own.
    assert RunConfig(arm="csg+int8", downlink="fp16").downlink_mode == "fp16"
    assert RunConfig(arm="csg+int8/int8", downlink="fp16").downlink_mode == "int8"
    assert RunConfig(arm="csg+int8/int8").model_settings().arm == "csg"
    with pytest.raises(ValueError, match="downlink = 'int4' is not accepted: one of full, fp16, int8"):
        RunConfig(downlink="int4")
    # Arm names are file names: the "/" is spelled "~" there, and read back.
    for arm in ("csg", "csg+int8", *two_way_arms()):
        assert "/" not in file_stem(arm) and arm_of_stem(file_stem(arm)) == arm
    assert file_stem("csg") == "csg" and file_stem("csg+int8/int8") == "csg+int8~int8"


def test_bad_downlink_arm_on_the_command_line_is_one_line_exit_2(cli) -> None:
    code, out, err = cli("compare", "--arms", "fedavg,csg+int8/int9")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "unknown arm 'csg+int8/int9'" in err


# -- stateless int8 -------------------------------------------------------------------------------


def test_blockwise_int8_round_trip_is_within_half_a_step_on_a_resnet20_payload() -> None:
    cfg = RunConfig(model="resnet20", arm="csg/int8")
    layout = payload_layout(cfg, build_arm_model(cfg))
    arrays = model_payload(build_arm_model(cfg), layout)
    downlink = Downlink.of_config(cfg, layout)
    sent = downlink.encode(arrays)
    back = downlink.decode(sent)
    values, decoded = flat_floats(arrays, layout), flat_floats(back, layout)
    blocks = block_lengths([e.numel for e in layout.floating], BLOCK)
    # One float32 scale a block of 256 (never straddling two tensors), one byte a value, counters as they are
    assert sent["down.scale"].shape == (len(blocks),) and sent["down.int8"].shape == (values.size,)
    assert payload_bytes(sent) == values.size + 4 * len(blocks) + 8 * 19
    assert np.array_equal(sent["int64"].numpy(), arrays["int64"].numpy())
    step = np.repeat(sent["down.scale"].numpy().astype(np.float64), blocks)
    error = np.abs(decoded - values)
    assert np.all(error <= step / 2 * (1 + 1e-6) + 1e-7 * np.abs(values))  # half a step, plus the float32 cast
    assert np.linalg.norm(decoded - values) / np.linalg.norm(values) < 6e-3  # docs/downlink.md: 5.7e-3
    with pytest.raises(ValueError, match="payload entry 'down.int8'"):
        downlink.decode(ArrayRecord({**dict(sent.items()), "down.int8": Array(np.zeros(3, dtype=np.int8))}))


# -- delta downlinks through the strategy's round loop ---------------------------------------------


class Nodes:
    """The clients of an in-memory grid: each keeps its Context.state, receives as the ClientApp does
    and replies with a small update of what it received; what each received is recorded with the
    server's x̂ of that moment."""

    def __init__(self, cfg: RunConfig, strategy: CSGFedAvg, absent: dict[int, set[int]] | None = None) -> None:
        self.strategy, self.absent = strategy, absent or {}
        self.layout = strategy.layout
        self.downlink = Downlink.of_config(cfg, self.layout)
        self.uplink = Uplink(self.layout, cfg.codec)
        self.states: dict[int, RecordDict] = {}
        self.received: list[tuple[int, int, ArrayRecord, ArrayRecord, bool]] = []  # round, node, got, x̂, resync
        self.raised: list[tuple[int, int, str]] = []

    def __call__(self, position: int, node: int, message: Message) -> RecordDict | Error | None:
        instruction = TrainInstruction.of_record(message.content[CONFIG])
        server_round = instruction.server_round
        if position in self.absent.get(server_round, set()):
            return None  # no reply: the node failed this round
        state = self.states.setdefault(node, RecordDict())
        try:
            got = receive(self.downlink, message.content["arrays"], instruction.downlink, state)
        except DownlinkOutOfSync as error:
            self.raised.append((server_round, node, str(error)))
            return Error(code=1, reason=str(error))
        x_hat = self.strategy.broadcaster.x_hat
        assert instruction.downlink is not None
        self.received.append((server_round, node, got, x_hat, instruction.downlink.kind == "full"))
        rng = np.random.default_rng((server_round, node))
        local = ArrayRecord(
            {
                k: Array((a.numpy() + rng.normal(0, 1e-2, a.shape)).astype(a.numpy().dtype))
                if k in self.layout.floating_keys()
                else a
                for k, a in got.items()
            }
        )
        reply, _ = self.uplink.encode(local, got, None, rng)
        metrics = TrainReply(10, 1.0, 0.5, 1.0, partition_id=position, downlink_version=instruction.downlink.version)
        return RecordDict({"arrays": reply, "metrics": metrics.record()})


def _setup(arm: str, **changes: object) -> tuple[RunConfig, CSGFedAvg, ArrayRecord]:
    cfg = RunConfig(**SMALL, arm=arm, num_clients=4, num_rounds=10, min_train_nodes=1, **changes)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    return cfg, build_strategy(cfg, layout, model), model_payload(model, layout)


def _run(strategy: CSGFedAvg, grid: ScriptedGrid, initial: ArrayRecord, rounds: int, first: int = 1) -> ArrayRecord:
    offline_task_identity()
    out = strategy.start(grid, initial, rounds, train_config=RUN_INSTRUCTION, first_round=first, evaluate_initial=False)
    return out.arrays


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("arm", ["csg+int8/delta-int8", "fedavg/delta-topk"])
def test_delta_clients_hold_the_servers_x_hat_bit_for_bit_and_skipped_clients_are_resynced(arm: str) -> None:
    cfg, strategy, initial = _setup(arm, fraction_train=0.5, downlink_topk_fraction=0.2)
    nodes = Nodes(cfg, strategy)
    grid = ScriptedGrid([11, 12, 13, 14], nodes)
    final = _run(strategy, grid, initial, 6)
    # Every node trained, every round, from exactly the server's x̂, in sync or resynced.
    assert len(nodes.received) == 6 * 2
    for _, _, got, x_hat, _ in nodes.received:
        assert _same(got, x_hat)
    # A node is sent a delta only if it acknowledged the previous broadcast; every other is resynced in full.
    last_round: dict[int, int] = {}
    for server_round, node, _, _, resync in nodes.received:
        assert resync == (last_round.get(node) != server_round - 1), (server_round, node)
        last_round[node] = server_round
    resyncs = sum(r[4] for r in nodes.received)
    assert 2 <= resyncs < 12  # round 1 resyncs both; with 4 nodes and 2 sampled some are in sync later
    # The records split the downlink bytes into in-sync and resync messages, each counted as sent.
    wire = {
        kind: [accounted_wire_bytes(m) for m in grid.sent if m.content["config"]["downlink-kind"] == kind]
        for kind in ("delta", "full")
    }
    assert len(wire["full"]) == resyncs and len(wire["delta"]) == 12 - resyncs
    assert max(wire["delta"]) < 0.5 * min(wire["full"])  # a compressed change against the whole x̂
    assert sum(strategy.traffic[r].resynced for r in range(1, 7)) == resyncs
    assert sum(strategy.traffic[r].wire_down_resync for r in range(1, 7)) == sum(wire["full"])
    assert sum(strategy.traffic[r].wire_down for r in range(1, 7)) == sum(wire["full"]) + sum(wire["delta"])
    assert strategy.traffic[1].wire_down_resync == strategy.traffic[1].wire_down > 0
    # The nodes of the last round hold the server's x̂; the server's own model is not x̂ (error fed back).
    for node in {n for r, n, *_ in nodes.received if r == 6}:
        held = nodes.states[node][STATE_MODEL]
        assert _same(held, strategy.broadcaster.x_hat) and model_hash(held) == strategy.broadcaster.digest
    assert not _same(final, strategy.broadcaster.x_hat)


def test_a_node_that_lost_its_state_fails_loudly_and_is_resynced_next_round() -> None:
    cfg, strategy, initial = _setup("csg+int8/delta-int8", fraction_train=1.0)
    nodes = Nodes(cfg, strategy)
    grid = ScriptedGrid([11, 12, 13, 14], nodes)
    arrays = _run(strategy, grid, initial, 2)
    nodes.states[12] = RecordDict()  # the node restarted: a fresh Context, while the server thinks it in sync
    held = nodes.states[13]
    held[STATE_HELD] = ConfigRecord({"version": 1, "hash": "0" * 16})  # wrong about its version
    arrays = _run(strategy, grid, arrays, 3, first=3)
    assert [(r, n) for r, n, _ in nodes.raised] == [(3, 12), (3, 13)]
    assert "sent a delta against version 2, this client holds no model" in nodes.raised[0][2]
    assert "this client holds version 1" in nodes.raised[1][2]
    assert strategy.traffic[3].failed == 2 and strategy.traffic[3].replied == 2
    _run(strategy, grid, arrays, 4, first=4)
    assert strategy.traffic[4].resynced == 2 and not nodes.raised[2:]
    assert all(_same(got, x) for r, _, got, x, _ in nodes.received if r == 4)
    # A node whose x̂ was damaged decodes a model whose hash is not the server's, and raises too.
    state = nodes.states[11]
    damaged = state[STATE_MODEL]
    first_key = next(iter(damaged))
    values = damaged[first_key].numpy().copy()
    values[0] += 1.0
    state[STATE_MODEL] = ArrayRecord({**dict(damaged.items()), first_key: Array(values)})
    arrays = _run(strategy, grid, arrays, 5, first=5)
    assert nodes.raised[-1][:2] == (5, 11) and "hash" in nodes.raised[-1][2]


def test_a_fresh_context_does_not_train_from_a_stale_model(data_dir: Path) -> None:
    """The ClientApp sent a delta with nothing (or another version) in its Context.state raises before
    it trains: the model cached in its process holds some other node's weights."""
    cfg = RunConfig(
        **SMALL, arm="csg+int8/delta-int8", num_clients=2, train_limit=64, batch_size=32, data_dir=str(data_dir)
    )
    down, _ = round_messages(cfg)
    assert down.content["config"]["downlink-kind"] == "delta"
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    with pytest.raises(DownlinkOutOfSync, match="this client holds no model"):
        train(down, context)
    model_key, _ = state_keys(f"{cfg.arm}:{cfg.seed}")
    assert model_key not in context.state
    resync, _ = round_messages(cfg, resync=True)
    reply = train(resync, context)  # a resync trains, and the reply says which version the node holds
    assert reply.content["metrics"][DOWNLINK_VERSION] == int(resync.content["config"]["downlink-version"])
    assert model_hash(context.state[model_key]) == resync.content["config"]["downlink-hash"]
    # One node serves every run of a simulation: another arm's x̂ is kept apart.
    assert list(context.state) == [model_key, state_keys(f"{cfg.arm}:{cfg.seed}")[1]]


# -- bytes and checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["csg/full", "csg/fp16", "csg/int8", "csg+int8/delta-int8", "csg/delta-topk"])
def test_downlink_bytes_are_the_encoded_arrays_plus_flowers_framing(arm: str) -> None:
    cfg = RunConfig(**SMALL, arm=arm, downlink_topk_fraction=0.1)
    layout = payload_layout(cfg, build_arm_model(cfg))
    floats = sum(e.numel for e in layout.floating)
    ints = layout.nbytes - 4 * floats
    k = -(-floats // 10)
    expected = {
        "full": layout.nbytes,
        "fp16": 2 * floats + ints,
        "int8": floats + 4 * len(block_lengths([e.numel for e in layout.floating], BLOCK)) + ints,
        "delta-int8": floats + 4 * len(block_lengths([e.numel for e in layout.floating], BLOCK)) + ints,
        "delta-topk": 8 * k + ints,
    }[cfg.downlink_mode]
    for resync in (False, True):
        down, _ = round_messages(cfg, resync=resync)
        record = down.content["arrays"]
        size = layout.nbytes if resync and Downlink.of_config(cfg, layout).is_delta else expected
        assert payload_bytes(record) == size
        # Each Array travels as its .npy bytes (a header of at most 128 bytes), the rest is Flower's framing.
        for array in record.values():
            assert 0 < len(array.data) - int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize <= 128
        framing = accounted_wire_bytes(down) - sum(len(a.data) for a in record.values())
        # Metadata, config (a delta downlink adds four keys) and object headers: 900-1,200 B, some 200 more an Array
        assert 0 < framing < 1200 + 200 * len(record), framing


def test_a_resumed_delta_run_resyncs_everyone_and_trains_from_the_uninterrupted_runs_x_hat(tmp_path: Path) -> None:
    cfg, strategy, initial = _setup("csg+int8/delta-int8", fraction_train=1.0)
    nodes = Nodes(cfg, strategy)
    arrays = _run(strategy, ScriptedGrid([11, 12, 13, 14], nodes), initial, 2)
    save_checkpoint(
        tmp_path,
        cfg.arm,
        2,
        arrays,
        num_rounds=4,
        rounds=[RoundRecord(r).as_dict() for r in range(3)],
        config={},
        identity=cfg.identity(),
        strategy=strategy.state_dict(),
        downlink_arrays=strategy.downlink_arrays(),
    )
    assert (tmp_path / "state" / "csg+int8~delta-int8.json").is_file()
    # The uninterrupted run goes on ...
    _run(strategy, ScriptedGrid([11, 12, 13, 14], nodes), arrays, 3, first=3)
    # ... and a resumed one (a new run: new node ids, fresh Contexts) from the checkpoint.
    checkpoint = load_checkpoint(tmp_path, cfg.arm, strategy.layout)
    assert checkpoint is not None and _same(checkpoint.arrays, arrays)
    _, resumed, _ = _setup("csg+int8/delta-int8", fraction_train=1.0)
    resumed.load_state_dict(checkpoint.strategy, checkpoint.downlink_arrays)
    fresh = Nodes(cfg, resumed)
    _run(resumed, ScriptedGrid([21, 22, 23, 24], fresh), checkpoint.arrays, 3, first=3)
    assert resumed.traffic[3].resynced == 4 and strategy.traffic[3].resynced == 0
    assert resumed.traffic[3].wire_down > strategy.traffic[3].wire_down
    for (_, _, got, _, _), (_, _, before, _, _) in zip(fresh.received, nodes.received[-4:], strict=True):
        assert _same(got, before)  # the same x̂ of round 3, sent in full instead of as a delta
    with pytest.raises(ValueError, match="has no x̂"):
        _setup("csg+int8/delta-int8")[1].load_state_dict(checkpoint.strategy, None)
