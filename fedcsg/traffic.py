"""Bytes of one round of each arm, from real Flower messages built offline (no training)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcsg.config import RunConfig
from fedcsg.params import count_parameters
from fedcsg.payload import model_payload, payload_bytes
from fedcsg.strategy import accounted_wire_bytes
from fedcsg.task import build_arm_model, payload_layout


def _ensure_task_identity() -> None:
    # Flower stamps every Message with the identity of the running task; offline there is none.
    for name in ("run_id", "task_id", "node_id"):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, 1)


def train_replies(records: list[ArrayRecord], examples: list[object]) -> list[Message]:
    """Offline train replies, one per record, from nodes 1, 2, ... with ``examples`` as their
    num-examples (as a ClientApp would reply; for tests of aggregation)."""
    _ensure_task_identity()
    replies = []
    for node, (record, num) in enumerate(zip(records, examples, strict=True), start=1):
        down = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
        metrics = MetricRecord({"num-examples": num, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 1.0})
        replies.append(Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=down))
    return replies


def round_messages(cfg: RunConfig, node_id: int = 1) -> tuple[Message, Message]:
    """The train message a client receives and the reply it sends, as CSGFedAvg and the ClientApp
    build them (same records, keys and metrics)."""
    _ensure_task_identity()
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    arrays = model_payload(model, layout)
    config = ConfigRecord(
        {"local-epochs": cfg.local_epochs, "batch-size": cfg.batch_size, "lr": cfg.lr, "attempt": 0, "server-round": 1}
    )
    down = Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=node_id, message_type=MessageType.TRAIN
    )
    metrics = MetricRecord(
        {"num-examples": 5000, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 1.0, "partition-id": 0}
    )
    up = Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=down)
    return down, up


def arm_traffic(cfg: RunConfig, clients_per_round: int) -> dict:
    """Payload and wire bytes of one round of ``cfg.arm`` with ``clients_per_round`` clients."""
    down, up = round_messages(cfg)
    arrays = down.content["arrays"]
    model = build_arm_model(cfg)
    return {
        "arm": cfg.arm,
        "parameters_sendable": count_parameters(model).sendable,
        "tensors": len(payload_layout(cfg, model).entries),
        "arrays_per_message": len(arrays),
        "payload_per_client": payload_bytes(arrays),
        "wire_up_per_client": accounted_wire_bytes(up),
        "wire_down_per_client": accounted_wire_bytes(down),
        "payload_up": payload_bytes(arrays) * clients_per_round,
        "payload_down": payload_bytes(arrays) * clients_per_round,
        "wire_up": accounted_wire_bytes(up) * clients_per_round,
        "wire_down": accounted_wire_bytes(down) * clients_per_round,
    }
