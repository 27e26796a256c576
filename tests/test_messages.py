"""The message schema (fedcsg.wire.messages): every key of a train message and of its reply is named
there once, the strategy writes its messages through TrainInstruction, and a client reads them back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

import fedcsg
from fedcsg.fl.flower_private import offline_task_identity
from fedcsg.fl.server_app import build_strategy, run_instruction
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.spec.config import RunConfig
from fedcsg.wire import messages
from fedcsg.wire.messages import CONFIG, DownlinkSync, TrainInstruction, TrainReply
from fedcsg.wire.payload import model_payload

from .test_reliability import ScriptedGrid


def test_the_strategy_writes_the_run_and_the_round_through_the_instruction() -> None:
    cfg = RunConfig(
        model="fmnist-cnn",
        dataset="fashion-mnist",
        arm="csg+int8/delta-int8",
        csg_aggregation="alternate",
        local_epochs=3,
        batch_size=8,
        seed=4,
        lr=0.2,
        num_clients=1,
        min_train_nodes=1,
        min_available_nodes=1,
    )
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    strategy = build_strategy(cfg, layout, model)
    offline_task_identity()
    grid = ScriptedGrid([5], lambda position, node, message: None)
    (message,) = strategy.configure_train(2, model_payload(model, layout), run_instruction(cfg).record(), grid)
    config = message.content[CONFIG]
    instruction = TrainInstruction.of_record(config)
    sync = DownlinkSync("full", 0, 1, strategy.broadcaster.digest)  # a first broadcast: x̂ in full
    expected = TrainInstruction(
        3, 8, server_round=2, lr=0.2, arm="csg+int8/delta-int8", seed=4, train_factor="generator"
    )
    assert instruction == expected.replace(downlink=sync)
    assert list(instruction.record().items()) == list(config.items())  # read back to the type and the order
    assert list(config) == [
        "local-epochs",
        "batch-size",
        "arm",
        "seed",
        "lr",
        "attempt",
        "server-round",
        "train-factor",
        "downlink-version",
        "downlink-hash",
        "downlink-base",
        "downlink-kind",
    ]


def test_an_instruction_without_its_training_settings_is_one_line() -> None:
    with pytest.raises(ValueError) as error:
        TrainInstruction.of_record(ConfigRecord({"lr": 0.1, "server-round": 1}))
    assert str(error.value) == "the train message's config lacks local-epochs, batch-size"
    bare = TrainInstruction.of_record(ConfigRecord({"local-epochs": 1, "batch-size": 2, "lr": 0.1, "server-round": 1}))
    assert (bare.arm, bare.seed, bare.train_factor, bare.downlink, bare.handoff_hash) == ("", None, "", None, None)


def test_a_reply_names_what_its_node_holds_only_when_it_holds_it() -> None:
    plain = TrainReply(10, 1.5, 0.25, 2.0, partition_id=3).record()
    assert dict(plain) == {
        "num-examples": 10,
        "train-loss": 1.5,
        "train-accuracy": 0.25,
        "train-seconds": 2.0,
        "partition-id": 3,
    }
    held = TrainReply(10, 1.5, 0.25, 2.0, partition_id=3, downlink_version=7, handoff_hash=11).record()
    assert dict(held) == {**plain, "downlink-version": 7, "handoff-hash": 11}


def test_no_module_but_the_schema_spells_a_message_key() -> None:
    keys = {
        value
        for name, value in vars(messages).items()
        if name.isupper() and isinstance(value, str) and "-" in value  # the kebab keys; "lr", "arm" are words
    } - {messages.LOCAL_EPOCHS, messages.BATCH_SIZE}  # also the names of the run's settings, in its records
    assert {"server-round", "train-factor", "downlink-version", "handoff-hash", "num-examples"} <= keys
    package = Path(fedcsg.__file__).parent
    spelled = [
        f"{path.relative_to(package)}: {node.value}"
        for path in sorted(package.rglob("*.py"))
        if path != Path(messages.__file__)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in keys
    ]
    assert spelled == []
