"""Reliability: client faults, bad updates, crash-safe checkpoints and resume, bad input.

The strategy tests drive CSGFedAvg's real round loop (``start``) through an in-memory grid whose
clients answer as each test tells them (no Ray); the end-to-end tests run ``fedcsg run`` through
Flower's simulation engine on Ray in subprocesses, two of them in the background from the start
so that the slow parts overlap.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid

from fedcsg.cli import main
from fedcsg.fl.client_app import injected_fault
from fedcsg.fl.flower_private import offline_task_identity
from fedcsg.fl.server_app import recorded_config
from fedcsg.fl.strategy import CSGFedAvg, sample_positions
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.fl.traffic import accounted_wire_bytes
from fedcsg.runs.checkpoint import (
    config_hash,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_path,
    weights_path,
)
from fedcsg.runs.records import ArmRecorder, RoundRecord, comparable
from fedcsg.spec.config import RunConfig
from fedcsg.wire.messages import TrainInstruction, VersionMismatch
from fedcsg.wire.payload import PayloadLayout, model_payload

from .processes import kill_session, session_pids

ROOT = Path(__file__).resolve().parents[1]

# The SIGKILL/resume run: 2 clients, 4 rounds, a few hundred CIFAR-10 images.
KILL_RUN = ["num-clients=2", "num-rounds=4", "train-limit=400", "test-limit=200", "local-epochs=1", "batch-size=32"]
# Fault injection: 4 clients, 30% of client-rounds raise. Seed 1 fails partition 3 in round 1, none in
# round 2 and partitions 0, 1, 2 in round 3 (fewer than min-train-nodes = 2 left: a failed round).
FAULT_RUN = [
    "num-clients=4",
    "num-rounds=3",
    "train-limit=400",
    "test-limit=200",
    "local-epochs=1",
    "batch-size=32",
    "fault-probability=0.3",
    "seed=1",
]
# Every client fails in every round (the reproduction: it used to exit 0, or with a traceback).
ALL_FAIL_RUN = ["num-clients=2", "num-rounds=2", "train-limit=128", "test-limit=64", "fault-probability=1.0"]


def _sets(pairs: list[str]) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


# -- an in-memory grid for the strategy's round loop --------------------------------------------

Responder = Callable[[int, int, Message], RecordDict | Error | None]


class ScriptedGrid(Grid):
    """Nodes registered in a given order; ``respond(position, node_id, message)`` returns the reply
    content, an Error (the client raised) or None (no reply within the timeout)."""

    def __init__(self, node_ids: list[int], respond: Responder) -> None:
        self.node_ids = node_ids
        self.respond = respond
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # noqa: ANN001 - unused
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201 - unused
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003 - unused
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return set(self.node_ids)  # no order, like Flower's link state

    def get_nodes(self) -> Iterable[NodeInfo]:
        stamps = [f"2025-01-01T00:00:{i:02d}.000000+00:00" for i in range(len(self.node_ids))]
        return [NodeInfo(node_id=n, registered_at=s) for n, s in zip(self.node_ids, stamps, strict=True)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            answer = self.respond(self.node_ids.index(node), node, message)
            if answer is not None:
                replies.append(Message(answer, reply_to=message))
        return replies


def _small() -> tuple[torch.nn.Module, PayloadLayout, ArrayRecord]:
    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", slice="8x8x3x3", code_dim=32)
    model = build_arm_model(cfg)
    layout = PayloadLayout.for_model(model, "per-tensor")
    return model, layout, model_payload(model, layout)


def _shifted(record: ArrayRecord, delta: float) -> ArrayRecord:
    out = {}
    for key, array in record.items():
        values = array.numpy()
        out[key] = Array(
            values + np.asarray(delta, values.dtype) if np.issubdtype(values.dtype, np.floating) else values
        )
    return ArrayRecord(out)


def _reply(arrays: ArrayRecord, examples: object, partition: int) -> RecordDict:
    metrics = MetricRecord(
        {
            "num-examples": examples,
            "train-loss": 1.0,
            "train-accuracy": 0.5,
            "train-seconds": 1.0,
            "partition-id": partition,
        }
    )
    return RecordDict({"arrays": arrays, "metrics": metrics})


RUN_INSTRUCTION = TrainInstruction(local_epochs=1, batch_size=16).record()  # what a scripted grid's nodes are told


def _run_rounds(
    strategy: CSGFedAvg, grid: ScriptedGrid, initial: ArrayRecord, num_rounds: int
) -> dict[int, ArrayRecord]:
    """The global payload after every round, as the round loop hands it to the checkpoint."""
    offline_task_identity()
    seen: dict[int, ArrayRecord] = {}
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=1.0,
        train_config=RUN_INSTRUCTION,
        round_end_fn=lambda server_round, arrays: seen.__setitem__(server_round, arrays),
    )
    return seen


def _equal(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def _finite(record: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in record.values() if np.issubdtype(a.numpy().dtype, np.floating))


def _bad_payloads(good: ArrayRecord) -> dict[str, tuple[ArrayRecord, object, str]]:
    """name -> (payload, num-examples, the reason the log must give)."""
    entries = dict(good.items())
    nan = {**entries, "fc.weight": Array(np.full(entries["fc.weight"].shape, np.nan, np.float32))}
    inf = {**entries, "fc.bias": Array(np.full(entries["fc.bias"].shape, np.inf, np.float32))}
    wrong_dtype = {**entries, "fc.bias": Array(entries["fc.bias"].numpy().astype(np.float64))}
    return {
        "nan": (ArrayRecord(nan), 5, "payload entry 'fc.weight' has non-finite values"),
        "inf": (ArrayRecord(inf), 5, "payload entry 'fc.bias' has non-finite values"),
        "missing-key": (ArrayRecord({k: v for k, v in entries.items() if k != "fc.bias"}), 5, "missing ['fc.bias']"),
        "extra-key": (ArrayRecord({**entries, "intruder": Array(np.zeros(3, np.float32))}), 5, "['intruder']"),
        "wrong-shape": (
            ArrayRecord({**entries, "fc.bias": Array(np.zeros(11, np.float32))}),
            5,
            "payload entry 'fc.bias' is float32[11], expected float32[10]",
        ),
        "wrong-dtype": (ArrayRecord(wrong_dtype), 5, "payload entry 'fc.bias' is float64[10], expected float32[10]"),
        "zero-examples": (good, 0, "num-examples must be a positive integer, got 0"),
        "negative-examples": (good, -4, "num-examples must be a positive integer, got -4"),
        "float-examples": (good, 5.0, "num-examples must be a positive integer, got 5.0"),
        "too-far": (_shifted(good, 1.0), 5, "exceeds max-update-norm = 10"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "inf",
        "missing-key",
        "extra-key",
        "wrong-shape",
        "wrong-dtype",
        "zero-examples",
        "negative-examples",
        "float-examples",
        "too-far",
    ],
)
def test_each_bad_reply_is_rejected_logged_and_never_reaches_the_model(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, layout, initial = _small()
    bad, examples, reason = _bad_payloads(initial)[case]
    good = _shifted(initial, 1e-3)  # a small honest update: norm well under the bound
    nodes = [9_000_000_000_000_000_011, 17, 4242]  # random-looking ids, registered in partition order

    # Alone, the bad reply leaves the round without an accepted update: the global model is kept.
    alone = CSGFedAvg(
        layout, lr_fn=lambda r: 0.1, max_update_norm=10.0, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1
    )
    grid = ScriptedGrid(nodes[:1], lambda pos, node, msg: _reply(bad, examples, pos))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        seen = _run_rounds(alone, grid, initial, num_rounds=2)
    assert _equal(seen[1], initial) and _equal(seen[2], initial) and _finite(seen[2])
    traffic = alone.traffic[1]
    assert (traffic.sampled, traffic.replied, traffic.failed, traffic.rejected) == (1, 1, 0, 1)
    assert traffic.status == "failed" and traffic.partitions == []
    lines = [r.getMessage() for r in caplog.records if "rejected reply" in r.getMessage()]
    assert lines[0].startswith(f"round 1: rejected reply from node {nodes[0]} (partition 0): "), lines
    assert reason in lines[0], lines

    # Among honest replies, it is the honest ones alone that make the new global model.
    mixed = CSGFedAvg(layout, lr_fn=lambda r: 0.1, max_update_norm=10.0, fraction_train=1.0, min_train_nodes=3)
    caplog.clear()

    def respond(pos: int, node: int, msg: Message) -> RecordDict:
        return _reply(bad, examples, pos) if pos == 1 else _reply(good, 7 + pos, pos)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        seen = _run_rounds(mixed, ScriptedGrid(nodes, respond), initial, num_rounds=1)
    assert _equal(seen[1], good) and _finite(seen[1])  # the average of two identical honest payloads
    traffic = mixed.traffic[1]
    assert (traffic.sampled, traffic.replied, traffic.rejected, traffic.partitions) == (3, 3, 1, [0, 2])
    assert any(f"node {nodes[1]} (partition 1)" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_missing_train_metrics_are_rejected_not_fatal() -> None:
    _, layout, initial = _small()
    broken = RecordDict({"arrays": initial, "metrics": MetricRecord({"num-examples": 5, "partition-id": 0})})
    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    seen = _run_rounds(strategy, ScriptedGrid([5], lambda pos, node, msg: broken), initial, num_rounds=1)
    assert strategy.traffic[1].rejected == 1 and _equal(seen[1], initial)


def test_failed_clients_are_counted_and_the_round_aggregates_the_rest() -> None:
    _, layout, initial = _small()
    good = _shifted(initial, 1e-3)
    nodes = [71, 13, 2**63 + 1, 5]

    def respond(pos: int, node: int, msg: Message) -> RecordDict | Error | None:
        if pos == 1:
            return Error(code=1, reason="the client raised")
        if pos == 3:
            return None  # timed out or vanished
        return _reply(good, 10, pos)

    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, min_replies=2, fraction_train=1.0, min_train_nodes=2)
    seen = _run_rounds(strategy, ScriptedGrid(nodes, respond), initial, num_rounds=1)
    traffic = strategy.traffic[1]
    assert (traffic.sampled, traffic.replied, traffic.failed, traffic.rejected) == (4, 2, 2, 0)
    assert traffic.replied + traffic.failed == traffic.sampled
    assert traffic.partitions == [0, 2] and sorted(traffic.failed_partitions) == [1, 3]
    assert traffic.status == "ok" and _equal(seen[1], good)


def test_a_node_on_another_fedcsg_is_named_by_the_server_in_one_line_and_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node whose fedcsg differs refuses the round (its ClientApp's VersionMismatch, as Flower hands
    the server a ClientApp's exception); the server logs one line naming the node and both versions,
    records the node in ``version_mismatch`` and aggregates the others; other failures are not
    mistaken for it."""
    _, layout, initial = _small()
    good = _shifted(initial, 1e-3)
    nodes = [71, 13, 5]
    refusal = VersionMismatch.of("0.0.9", "0.1.0")
    flower_wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'Exception ClientAppException occurred. "
        f"Message: {refusal}'>"
    )

    def respond(pos: int, node: int, msg: Message) -> RecordDict | Error | None:
        if pos == 1:
            return Error(code=2, reason=flower_wrapped)
        return Error(code=2, reason="the client raised") if pos == 2 else _reply(good, 10, pos)

    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, min_replies=1, fraction_train=1.0, min_train_nodes=1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _run_rounds(strategy, ScriptedGrid(nodes, respond), initial, num_rounds=1)
    traffic = strategy.traffic[1]
    assert (traffic.replied, traffic.failed, traffic.version_mismatch, traffic.status) == (1, 2, [13], "ok")
    lines = [r.getMessage() for r in caplog.records if "refused the run" in r.getMessage()]
    assert lines == [
        "round 1: node 13 refused the run: it runs fedcsg 0.0.9, this server fedcsg 0.1.0; install fedcsg 0.1.0 on it"
    ]
    assert VersionMismatch.versions_in(str(refusal)) == ("0.0.9", "0.1.0")
    assert VersionMismatch.versions_in("client node 5 failed: the client raised") is None


def test_the_superlinks_reply_for_a_silent_node_is_that_nodes_failure() -> None:
    """The SuperLink answers for a node whose heartbeat expired with an error reply of its own (its
    source is the SuperLink, it answers the node's message): the round records that node's failure
    with the SuperLink's reason, not a timeout."""
    from fedcsg.fl.flower_private import SUPERLINK_NODE_ID

    _, layout, initial = _small()
    good = _shifted(initial, 1e-3)
    unavailable = "Error: Node Unavailable - the destination node failed to report a heartbeat"

    class SuperLinkGrid(ScriptedGrid):
        def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ANN001
            replies = []
            for i, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's grids do when they push
                if message.metadata.dst_node_id == 13:
                    reply = Message(Error(code=5, reason=unavailable), reply_to=message)
                    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                else:
                    reply = Message(_reply(good, 10, 0), reply_to=message)
                replies.append(reply)
            return replies

    strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, min_replies=1, fraction_train=1.0, min_train_nodes=1)
    _run_rounds(strategy, SuperLinkGrid([71, 13], lambda *_: None), initial, num_rounds=1)
    traffic = strategy.traffic[1]
    assert (traffic.replied, traffic.failed, traffic.status) == (1, 1, "ok")
    assert traffic.first_error.startswith("client node 13 (partition ")
    assert traffic.first_error.endswith(f"failed: {unavailable}")


class RunGrid(ScriptedGrid):
    """A :class:`ScriptedGrid` with a run (no app bundle), as the ServerApp asks its grid for one."""

    @property
    def run(self):  # noqa: ANN201
        from flwr.supercore.run import Run

        return Run.create_empty(run_id=1)


# What Flower hands the server when a ClientApp raised (the client's exception inside).
MISSING_DATA = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'Exception ClientAppException occurred. "
    "Message: cifar10 not found: looked in $FEDCSG_DATA_DIR=/srv/none'>"
)


def test_a_run_in_which_every_client_fails_raises_after_writing_its_records(tmp_path: Path, data_env: Path) -> None:
    """The ServerApp of a simulation plan: every client of every round fails (its data directory is
    missing), so the run stops with RunFailed naming the arm, the round and the first client error,
    after its records and checkpoint are written; a later run of the plan never starts."""
    from flwr.app import ConfigRecord, Context

    from fedcsg.fl.server_app import PLAN_KEY
    from fedcsg.fl.server_app import main as server_main
    from fedcsg.runs.records import RunFailed

    offline_task_identity()
    cfg = _tiny_cfg(tmp_path / "out", num_rounds=2, round_timeout=5.0).replace(arm="fedavg")
    plan = [json.dumps(c.to_flower()) for c in (cfg, cfg.replace(arm="csg"))]
    context = Context(1, 0, {}, RecordDict({PLAN_KEY: ConfigRecord({"runs": plan})}), cfg.to_flower())
    grid = RunGrid([11, 12], lambda pos, node, msg: Error(code=0, reason=MISSING_DATA))
    with pytest.raises(RunFailed) as failed:
        server_main(grid, context)
    message = str(failed.value)
    assert "\n" not in message
    assert message == (
        "arm 'fedavg' aggregated no client update in rounds 1..2 (0 replies accepted in all); round 1: client "
        "node 11 (partition 0) failed: cifar10 not found: looked in $FEDCSG_DATA_DIR=/srv/none"
    )
    rounds = json.loads((tmp_path / "out" / "arms" / "fedavg.json").read_text())["rounds"]
    assert [(r["round"], r["status"], r["failed"]) for r in rounds] == [
        (0, "initial", 0),
        (1, "failed", 2),
        (2, "failed", 2),
    ]
    assert load_checkpoint(tmp_path / "out", "fedavg").round == 2
    assert not (tmp_path / "out" / "arms" / "csg.json").exists()
    # The report of such a run names it and divides by nothing (fedavg sent no byte up).
    from fedcsg.runs.report import write_report

    write_report(tmp_path / "out")
    assert "| fedavg |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_a_round_with_too_few_replies_is_skipped_or_retried(policy: str) -> None:
    _, layout, initial = _small()
    good = _shifted(initial, 1e-3)
    nodes = [31, 7, 19]

    def respond(pos: int, node: int, msg: Message) -> RecordDict | Error:
        config = msg.content["config"]
        if config["server-round"] == 1 and config["attempt"] == 0:
            return Error(code=1, reason="injected")
        return _reply(good, 10, pos)

    strategy = CSGFedAvg(
        layout, lr_fn=lambda r: 0.1, min_replies=2, failed_round=policy, fraction_train=1.0, min_train_nodes=2
    )
    grid = ScriptedGrid(nodes, respond)
    seen = _run_rounds(strategy, grid, initial, num_rounds=2)
    first = strategy.traffic[1]
    round_one = [m for m in grid.sent if m.content["config"]["server-round"] == 1]
    if policy == "skip":
        assert (first.status, first.attempts, first.sampled, first.failed, first.replied) == ("failed", 1, 3, 3, 0)
        assert _equal(seen[1], initial)  # the global model is kept
        assert strategy.state_dict() == {"failed_rounds": [1]}
    else:
        assert (first.status, first.attempts, first.sampled, first.failed, first.replied) == ("ok", 2, 6, 3, 3)
        assert _equal(seen[1], good)
        # Bytes of both attempts are counted.
        assert len(round_one) == 6 and first.payload_down == 6 * layout.nbytes
        assert first.wire_down == sum(accounted_wire_bytes(m) for m in round_one)
    assert strategy.traffic[2].status == "ok" and strategy.traffic[2].attempts == 1


def test_sampling_depends_on_seed_and_round_only() -> None:
    _, layout, initial = _small()
    picked = []
    for ids in ([11, 2**62, 5, 2**63 + 7, 99, 3], [8, 1000, 2**40, 77, 2**64 - 2, 12]):
        random.seed(len(picked) * 1234)  # Python's global generator has no say
        strategy = CSGFedAvg(layout, lr_fn=lambda r: 0.1, seed=3, fraction_train=0.5, min_train_nodes=2)
        grid = ScriptedGrid(ids, lambda pos, node, msg: _reply(initial, 10, pos))
        _run_rounds(strategy, grid, initial, num_rounds=4)
        picked.append([strategy.traffic[r].partitions for r in range(1, 5)])
        # Byte counts do not depend on the random ids either.
        assert len({accounted_wire_bytes(m) for m in grid.sent}) == 1
    assert picked[0] == picked[1] == [sample_positions(3, r, 0, 6, 3) for r in range(1, 5)]
    assert len({tuple(p) for p in picked[0]}) > 1  # and it does change from round to round


@pytest.mark.parametrize(
    ("settings", "sampled"),
    [
        ({"num_clients": 10, "fraction_train": 0.35}, 3),
        ({"num_clients": 10, "fraction_train": 0.1}, 2),  # min-train-nodes 2
        ({"num_clients": 7, "clients_per_round": 3}, 3),
        ({"num_clients": 4, "min_train_nodes": 5, "min_available_nodes": 4}, 4),  # capped at num-clients
    ],
)
def test_a_round_samples_what_the_run_config_says(settings: dict, sampled: int) -> None:
    """One sample-size rule (spec.config.sample_size): the run config's count, the strategy's draw
    and the replies a round needs agree."""
    from fedcsg.fl.server_app import build_strategy, min_replies

    cfg = RunConfig(model="fmnist-cnn", dataset="fashion-mnist", slice="8x8x3x3", code_dim=32, **settings)
    model = build_arm_model(cfg)
    strategy = build_strategy(cfg, payload_layout(cfg, model), model)
    nodes = list(range(100, 100 + cfg.num_clients))
    drawn, _ = strategy._sample(1, 0, ScriptedGrid(nodes, lambda pos, node, msg: None))
    assert cfg.sampled_clients == len(drawn) == sampled
    assert min_replies(cfg) == min(cfg.min_train_nodes, sampled)


def test_fault_rule_is_deterministic() -> None:
    draws = [[injected_fault(1, r, p, 0.3) for p in range(4)] for r in range(1, 4)]
    assert draws == [[injected_fault(1, r, p, 0.3) for p in range(4)] for r in range(1, 4)]
    assert not any(injected_fault(1, r, p, 0.0) for r in range(1, 50) for p in range(8))
    rate = np.mean([injected_fault(0, r, p, 0.3) for r in range(1, 200) for p in range(10)])
    assert 0.25 < rate < 0.35
    assert [injected_fault(1, 3, p, 0.3, attempt=1) for p in range(4)] != draws[2]  # a retry draws anew


# -- checkpoints ----------------------------------------------------------------------------------


def _tiny_cfg(out: Path, **changes: object) -> RunConfig:
    """KILL_RUN on the default experiment, as `fedcsg run --set ...` makes it."""
    from fedcsg.spec.experiments import DEFAULT_EXPERIMENT, load_experiment

    values = {pair.split("=")[0]: int(pair.split("=")[1]) for pair in KILL_RUN}
    base = load_experiment(DEFAULT_EXPERIMENT)
    return RunConfig.from_mapping(values, base).replace(arm="csg", out_dir=str(out.absolute()), **changes)


def _checkpointed(out: Path, cfg: RunConfig | None = None, last_round: int = 0) -> tuple[RunConfig, ArrayRecord]:
    """A run directory whose arm (default csg) stopped after ``last_round``, as the ServerApp leaves it."""
    cfg = cfg or _tiny_cfg(out)
    model = build_arm_model(cfg)
    arrays = model_payload(model, payload_layout(cfg, model))
    recorder = ArmRecorder(out, cfg.arm, recorded_config(cfg))
    for server_round in range(last_round + 1):
        status = "ok" if server_round else "initial"
        recorder.add(RoundRecord(server_round, test_accuracy=0.1, status=status), save=False)
    recorder.save()
    save_checkpoint(
        out,
        cfg.arm,
        last_round,
        arrays,
        num_rounds=cfg.num_rounds,
        rounds=recorder.rounds,
        config=recorded_config(cfg),
        identity=cfg.identity(),
        strategy={"failed_rounds": []},
    )
    return cfg, arrays


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    cfg, arrays = _checkpointed(tmp_path)
    checkpoint = load_checkpoint(tmp_path, "csg", payload_layout(cfg, build_arm_model(cfg)))
    assert checkpoint is not None and checkpoint.round == 0 and list(checkpoint.arrays) == list(arrays)
    assert _equal(checkpoint.arrays, arrays)
    assert checkpoint.rounds == json.loads((tmp_path / "arms" / "csg.json").read_text())["rounds"]
    assert weights_path(tmp_path, "csg", 0).read_bytes()[:8] != b"\x80\x04\x95"  # safetensors, not a pickle
    # A later round replaces the weights file only after its state file is in place.
    save_checkpoint(
        tmp_path, "csg", 1, arrays, num_rounds=4, rounds=[], config={}, identity=cfg.identity(), strategy={}
    )
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["csg-round-0001.safetensors", "csg.json"]


def test_rng_state_round_trip() -> None:
    state = rng_state()
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    json.loads(json.dumps(state))  # JSON-safe
    set_rng_state(state)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def _rewrite_weights(out: Path, data: bytes) -> None:
    """Replace the weights file and make the state JSON vouch for the new bytes (size and sha256)."""
    import hashlib

    weights = weights_path(out, "csg", 0)
    weights.write_bytes(data)
    document = json.loads(state_path(out, "csg").read_text())
    document["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    state_path(out, "csg").write_text(json.dumps(document))


def test_truncated_or_damaged_checkpoint_is_detected_not_loaded(tmp_path: Path) -> None:
    _checkpointed(tmp_path)
    weights = weights_path(tmp_path, "csg", 0)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"are truncated or damaged: \d+ bytes, \d+ recorded"):
        load_checkpoint(tmp_path, "csg")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_checkpoint(tmp_path, "csg")
    _rewrite_weights(tmp_path, data[: len(data) - 100])  # truncated, and the JSON doctored to match
    with pytest.raises(ValueError, match="do not parse as safetensors"):
        load_checkpoint(tmp_path, "csg")
    state_path(tmp_path, "csg").write_text('{"format": 1, "arm": "csg", "rou')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_checkpoint(tmp_path, "csg")


# -- bad input: one line, exit code 2, nothing written -----------------------------------------


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def _one_line_exit_2(args: list[str], message: str, watched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(watched)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert _snapshot(watched) == before  # nothing written before the input is validated


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["colour=blue"], "unknown config key 'colour'"),
        (["num-rounds=three"], "num-rounds = 'three' (str) is not accepted: a int is"),
        (["num-rounds=2.5"], "num-rounds = 2.5 (float) is not accepted: a int is"),
        (["num-clients=0"], "num-clients = 0 is not accepted: a positive integer is"),
        (["train-limit=-5"], "train-limit = -5 is not accepted: 0 or a positive integer is"),
        (["batch-size=-1"], "batch-size = -1 is not accepted: a positive integer is"),
        (["slice=12x12"], "slice shape '12x12' does not parse"),
        (["fault-probability=1.5"], "fault-probability = 1.5 is not accepted: a number in [0, 1] is"),
        (["failed-round=never"], "failed-round = 'never' is not accepted: one of skip, retry is"),
        (["max-update-norm=-1.0"], "max-update-norm = -1.0 is not accepted: a finite number >= 0 is"),
        (["seed=-1"], "seed = -1 is not accepted: 0 or a positive integer is"),
        (["data-dir='/no/such/dir'"], "data_dir '/no/such/dir' does not exist"),
    ],
)
def test_bad_config_one_line_exit_2(
    sets: list[str], message: str, tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _one_line_exit_2(["run", "--out", str(out), *_sets(sets)], message, tmp_path, capsys)
    assert not out.exists()


def test_data_dir_with_the_wrong_schema(tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "data" / "cifar10"
    bad.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": [b"x"], "target": [1]}), bad / f"{split}.parquet")
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--set", f"data-dir='{bad.parent}'", "--set", "dataset='cifar10'"]
    _one_line_exit_2(args, "found columns ['image', 'target']; expected parquet columns img", tmp_path, capsys)
    assert not out.exists()


def test_output_directory_holding_another_run(
    tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _checkpointed(out)
    same = ["run", "--arm", "csg", "--out", str(out), *_sets(KILL_RUN)]
    _one_line_exit_2(same, "already holds results of csg: pass --resume DIR to continue it", out, capsys)
    other = ["run", "--arm", "fedavg", "--out", str(out), *_sets([*KILL_RUN, "seed=5"])]
    _one_line_exit_2(other, "holds a run with another config (seed differ)", out, capsys)


def test_bad_resume_input(tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cfg, _ = _checkpointed(out)
    _one_line_exit_2(
        ["run", "--resume", str(tmp_path / "nope")],
        f"resume directory '{tmp_path / 'nope'}' does not exist",
        out,
        capsys,
    )
    _one_line_exit_2(["run", "--resume", str(out), "--overwrite"], "--resume and --overwrite exclude", out, capsys)
    _one_line_exit_2(
        ["run", "--resume", str(out), "--set", "seed=3"], "the config differs from the run in", out, capsys
    )
    _one_line_exit_2(["run", "--resume", str(tmp_path)], "holds no fedcsg run", out, capsys)
    _one_line_exit_2(
        ["run", "--resume", str(out), "--set", "local-epochs=0"], "local-epochs = 0 is not accepted", out, capsys
    )


def test_compare_resume_skips_complete_arms_continues_started_ones_runs_missing_ones(
    tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedcsg.cli import runs as commands

    out = tmp_path / "run"
    cfg = _tiny_cfg(out)
    _checkpointed(out, cfg, last_round=cfg.num_rounds)  # csg: complete
    _checkpointed(out, cfg.replace(arm="csg-frozen"), last_round=1)  # csg-frozen: killed after round 1
    simulated: list[tuple[str, bool]] = []
    monkeypatch.setattr(commands, "_simulate", lambda runs, o, v: simulated.extend((c.arm, c.resume) for c in runs))
    monkeypatch.setattr(commands, "_finish", lambda o, runs, placement: 0)
    assert main(["compare", "--resume", str(out)]) == 0
    assert simulated == [("fedavg", True), ("csg-frozen", True)]  # the config's order; fedavg starts at round 0
    printed = capsys.readouterr().out
    assert "arm csg: complete (4 rounds), skipped" in printed and "arm csg-frozen: resuming after round 1" in printed
    # `run --resume` of a directory with several arms must be told which one.
    assert main(["run", "--resume", str(out)]) == 2
    assert "holds arms csg, csg-frozen: pass --arm" in capsys.readouterr().err
    # An arm record without a checkpoint cannot be continued.
    (out / "state" / "csg-frozen.json").unlink()
    assert main(["compare", "--resume", str(out)]) == 2
    assert "has 1 of 4 rounds and no checkpoint to resume from" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_model(
    tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.numpy import save

    out = tmp_path / "run"
    _, arrays = _checkpointed(out)
    tensors = {k: arrays[k].numpy() for k in arrays}
    tensors["float32"] = tensors["float32"][:-10]
    _rewrite_weights(out, save(tensors))
    _one_line_exit_2(
        ["run", "--resume", str(out)],
        f"do not fit the model: payload entry 'float32' is float32[{arrays['float32'].shape[0] - 10}], expected",
        out,
        capsys,
    )


def test_truncated_checkpoint_is_refused_on_resume(
    tmp_path: Path, data_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _checkpointed(out)
    weights = weights_path(out, "csg", 0)
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_exit_2(["run", "--resume", str(out)], "are truncated or damaged: 1000 bytes", out, capsys)


def test_a_checkpoint_of_a_fedcsg_that_only_lacked_added_settings_resumes(tmp_path: Path) -> None:
    """A checkpoint written by a fedcsg that lacked settings added since (ADDED_SETTINGS: their recorded
    meaning is the old behaviour), its config and identity hash as that fedcsg wrote them, is the same run
    for the fedcsg installed now: its progress reads back; a config that differs in a setting is refused."""
    from fedcsg.runs.directory import arm_progress
    from fedcsg.spec.config import ADDED_SETTINGS

    out = tmp_path / "run"
    cfg, arrays = _checkpointed(out, last_round=1)
    state = json.loads(state_path(out, "csg").read_text())
    added = [k for k, old in ADDED_SETTINGS.items() if state["config"].get(k) == old]  # at their old behaviour
    assert {"dp", "freeze-generator-after", "image-column"} <= set(added)
    state["config"] = {k: v for k, v in state["config"].items() if k not in added}
    older = {k: v for k, v in cfg.identity().items() if k not in added}
    state["config_hash"] = config_hash(older)
    state_path(out, "csg").write_text(json.dumps(state))

    def layout_of(arm_cfg: RunConfig) -> PayloadLayout:
        return payload_layout(arm_cfg, build_arm_model(arm_cfg))

    assert arm_progress(out, cfg, "csg", layout_of) == 1
    with pytest.raises(ValueError, match=r"was written under another config \(lr differ\): accepted is --overwrite"):
        arm_progress(out, cfg.replace(lr=cfg.lr * 2), "csg", layout_of)


# -- end to end through Ray, in subprocesses ----------------------------------------------------


def _launch(args: list[str], log: Path, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir)}
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "fedcsg.cli", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: Ray's processes die with it
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def background(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterable[dict]:
    """The fault-injection run and a run in which every client fails, started at once."""
    root = tmp_path_factory.mktemp("reliability")
    runs = {
        "faults": (["run", "--arm", "csg", *_sets(FAULT_RUN)], root / "faults"),
        "all-fail": (
            ["run", "--arm", "fedavg", *_sets([*KILL_RUN[:1], "num-rounds=2", "fault-probability=1.0"])],
            root / "all-fail",
        ),
    }
    procs = {}
    for name, (args, out) in runs.items():
        log = root / f"{name}.log"
        procs[name] = (_launch([*args, "--out", str(out)], log, data_dir), out, log)
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            kill_session(proc)


def _state_round(out: Path) -> int | None:
    try:
        return json.loads(state_path(out, "csg").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigterm_stops_the_run_and_every_process_it_started(data_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to `fedcsg run` alone (not its group): it shuts down its private Ray and exits 143, no
    process of its session is left a few seconds later, and the records are whole up to the last
    completed round."""
    out = tmp_path / "terminated"
    log = tmp_path / "terminated.log"
    victim = _launch(["run", "--arm", "csg", "--out", str(out), *_sets(KILL_RUN)], log, data_dir)
    try:
        deadline = time.monotonic() + 600
        while (done := _state_round(out)) is None or done < 1:
            assert victim.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.1)
        assert len(session_pids(victim.pid)) > 3  # the CLI, Ray's GCS and raylet, the client actors
        victim.send_signal(signal.SIGTERM)
        victim.wait(timeout=60)
        deadline = time.monotonic() + 10
        while (left := session_pids(victim.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in left]
    finally:
        kill_session(victim)
    text = log.read_text()
    assert victim.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "fedcsg run: SIGTERM: stopped; the records hold every completed round" in text
    completed = _state_round(out)
    rounds = json.loads((out / "arms" / "csg.json").read_text())["rounds"]
    assert completed is not None and [r["round"] for r in rounds] in (
        list(range(completed + 1)),
        list(range(completed + 2)),
    )
    assert all(r["test_accuracy"] is not None for r in rounds)


def test_fault_injection_run_completes_and_records_the_failures(background: dict) -> None:
    proc, out, log = background["faults"]
    _finish(proc, log)
    results = json.loads((out / "results.json").read_text())
    rounds = results["arms"]["csg"]["rounds"][1:]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    expected = [[p for p in range(4) if injected_fault(1, r, p, 0.3)] for r in (1, 2, 3)]
    assert expected == [[3], [], [0, 1, 2]]
    for record, failing in zip(rounds, expected, strict=True):
        assert record["sampled"] == 4
        assert record["replied"] + record["failed"] == record["sampled"]
        assert record["failed"] == len(failing) and sorted(record["failed_partitions"]) == failing
        assert record["rejected"] == 0
        accepted = [p for p in range(4) if p not in failing]
        # min-train-nodes = 2: a round with fewer accepted replies keeps the global model.
        if len(accepted) >= 2:
            assert record["status"] == "ok" and record["partitions"] == accepted
        else:
            assert record["status"] == "failed" and record["partitions"] == []
    assert sum(r["failed"] for r in rounds) == 4
    # The failed round 3 evaluated the same global model as round 2.
    assert rounds[2]["test_loss"] == rounds[1]["test_loss"]
    assert rounds[2]["test_accuracy"] == rounds[1]["test_accuracy"]
    summary = results["summary"]["csg"]
    assert summary["failed_rounds"]["values"] == [1] and summary["failed_replies"]["values"] == [4]
    assert "client node" in log.read_text() and "injected fault" in log.read_text()


def test_a_run_in_which_every_client_fails_exits_non_zero_with_one_line(background: dict) -> None:
    """Through Ray: every client of both rounds raises, so `fedcsg run` exits 1 with one line naming
    the arm, the round and the first client error, after writing the records and the report
    (whose ratios do not divide by the 0 bytes fedavg sent up)."""
    proc, out, log = background["all-fail"]
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("fedcsg run: error: arm 'fedavg' aggregated no client update in rounds 1..2 (0 replies"), (
        last
    )
    assert "round 1: client node" in last and "injected fault: partition" in last, last
    rounds = json.loads((out / "arms" / "fedavg.json").read_text())["rounds"]
    assert [(r["round"], r["status"], r["replied"], r["failed"]) for r in rounds] == [
        (0, "initial", 0, 0),
        (1, "failed", 0, 2),
        (2, "failed", 0, 2),
    ]
    assert "| fedavg |" in (out / "report.md").read_text()
    assert "Traceback" not in text.split("== arm fedavg")[-1].split("[fedavg] round 2/2")[-1]


# -- kill anywhere: SIGKILL at file-system events of a two-seed compare, resumed each time ----------

# fedavg then csg, seed 0 then seed 1, two rounds each: the tiniest compare that has a round 0, a
# round in the middle, an arm after an arm and a seed after a seed.
KILL_ANYWHERE = ["num-clients=2", "num-rounds=2", "train-limit=128", "test-limit=64", "batch-size=32"]
KILL_ARMS = ["compare", "--arms", "fedavg,csg", "--seeds", "0,1", *_sets(KILL_ANYWHERE)]


def _committed(path: Path) -> int | None:
    """The round of the checkpoint a kill left of the arm whose record is ``path``, if any."""
    state = path.parent.parent / "state" / path.name
    return json.loads(state.read_text())["round"] if state.is_file() else None


def _state_of(path: Path) -> str:
    """What a kill left of one arm's files, for the table of docs/reliability.md."""
    state = path.parent.parent / "state" / path.name
    rounds = len(json.loads(path.read_text())["rounds"]) if path.is_file() else 0
    torn = len(list(state.parent.glob(".*.tmp"))) if state.parent.is_dir() else 0
    where = f"{path.parent.parent.name}/{path.stem}"
    return f"{where}: {rounds} rounds recorded, checkpoint {_committed(path)}, {torn} .tmp"


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_compare(data_dir: Path, tmp_path: Path) -> None:
    """One run directory, SIGKILLed at four file-system events and resumed after each (the driver
    alone is killed: the processes it started must die with it), then resumed to the end under other
    device settings than it started with (devices and shares are not the run's identity, docs/gpu.md):
    every arm of every seed records what the uninterrupted compare records (accuracy, loss, payload and
    wire bytes, clients: everything but seconds and Ray node ids), and ends on its weights."""
    reference = tmp_path / "reference"
    ref = _launch([*KILL_ARMS, "--out", str(reference)], tmp_path / "reference.log", data_dir)
    out = tmp_path / "killed"
    points = [  # (what, the file whose appearance (or round) triggers the kill)
        ("before round 0's checkpoint", out / "seed-0" / "arms" / "fedavg.json", None),
        ("mid-round (in round 2)", out / "seed-0" / "state" / "fedavg.json", 1),
        ("between arms", out / "seed-0" / "arms" / "csg.json", None),
        ("between seeds", out / "seed-1" / "arms" / "fedavg.json", None),
    ]
    table = []
    left = []  # the checkpoint round each kill left of its arm (None: none yet)
    try:
        args = [*KILL_ARMS, "--out", str(out)]
        for i, (what, trigger, at_round) in enumerate(points):
            log = tmp_path / f"kill-{i}.log"
            victim = _launch(args, log, data_dir)
            try:
                deadline = time.monotonic() + 600
                while not _reached(trigger, at_round):
                    assert victim.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, f"{what}: {trigger} never appeared"
                    time.sleep(0.005)
                os.kill(victim.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
                victim.wait(timeout=60)
                deadline = time.monotonic() + 15
                while (left := session_pids(victim.pid)) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert left == [], f"{what}: left alive {[_cmd(pid) for pid in left]}"
            finally:
                kill_session(victim)
            table.append((what, _state_of(trigger.parent.parent / "arms" / trigger.name)))
            left.append(_committed(trigger.parent.parent / "arms" / trigger.name))
            if at_round is not None:  # mid-round: the arm file is written just before the checkpoint
                committed = json.loads(trigger.read_text())["round"]
                partial = [
                    r["round"]
                    for r in json.loads((trigger.parent.parent / "arms" / trigger.name).read_text())["rounds"]
                ]
                assert committed == at_round and partial in (list(range(committed + 1)), list(range(committed + 2)))
            args = ["compare", "--resume", str(out)]
        other_devices = [
            "device=cpu",
            "server-device=cpu",
            "client-num-gpus=0",
            "clients-per-gpu=2",
            "deterministic=true",
        ]
        resumed = _finish(
            _launch([*args, *_sets(other_devices)], tmp_path / "resume.log", data_dir), tmp_path / "resume.log"
        )
        assert "== arm fedavg (seed 0): complete (2 rounds), skipped" in resumed
        _finish(ref, tmp_path / "reference.log")
    finally:
        if ref.poll() is None:
            kill_session(ref)
    for what, state in table:
        print(f"{what}: {state}")
    assert "== arm fedavg (seed 0): resuming after round 1" in (tmp_path / "kill-2.log").read_text()
    for seed in (0, 1):
        for arm in ("fedavg", "csg"):
            mine = json.loads((out / f"seed-{seed}" / "arms" / f"{arm}.json").read_text())
            theirs = json.loads((reference / f"seed-{seed}" / "arms" / f"{arm}.json").read_text())
            assert [r["round"] for r in mine["rounds"]] == [0, 1, 2]  # no round lost or counted twice
            assert comparable(mine["rounds"]) == comparable(theirs["rounds"]), (seed, arm)
            assert theirs["resumed_from"] == []
            # killed as an arm began: resumed from round 0, or started again where the kill came before its
            # checkpoint (the first kill's trigger is the record written just before it: either can happen);
            # seed 0's fedavg was killed there, then mid-round after round 1, and resumed from it
            if (seed, arm) == (0, "fedavg"):
                assert mine["resumed_from"] == [*([0] if left[0] == 0 else []), 1], (left, mine["resumed_from"])
            else:
                assert mine["resumed_from"] in ([], [0])
            a, b = (
                {k: v.numpy() for k, v in load_checkpoint(d / f"seed-{seed}", arm).arrays.items()}
                for d in (out, reference)
            )
            assert list(a) == list(b)
            assert max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a) <= 1e-6
            results = json.loads((out / f"seed-{seed}" / "results.json").read_text())
            assert results["arms"][arm]["rounds"] == mine["rounds"]
    assert not list(out.rglob("*.tmp")) and not (out / ".fedcsg.lock").exists()


def _reached(trigger: Path, at_round: int | None) -> bool:
    if at_round is None:
        return trigger.is_file()
    try:
        return json.loads(trigger.read_text())["round"] >= at_round
    except (OSError, ValueError, KeyError):
        return False


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:100]
    except OSError:
        return b"?"
