"""Byte accounting: raw payload bytes, serialized (wire) bytes of Flower messages with their random
ids counted at full width, and the bytes of one round of each arm from real Flower messages built
offline (no training)."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedcsg.fl.flower_private import (
    SUPERLINK_NODE_ID,
    ProtoMessage,
    Run,
    add_header_to_object_body,
    error_to_proto,
    fab_reply_bytes,
    get_all_nested_objects,
    metadata_to_proto,
    offline_task_identity,
)
from fedcsg.fl.ray_cluster import DEVICE_KEY, NODE_ID_HEX_LENGTH, NODE_ID_KEY, PLACEMENT, VISIBLE_KEY
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.nn.params import count_parameters
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import ModelSettings
from fedcsg.wire.downlink import STATELESS, Broadcaster, Downlink
from fedcsg.wire.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TrainInstruction,
    TrainReply,
)
from fedcsg.wire.payload import model_payload
from fedcsg.wire.uplink import Uplink

RANDOM_ID_FIELDS = ("run_id", "src_node_id", "dst_node_id", "src_task_id", "dst_task_id")  # Metadata's uint64s
WIDEST_ID = 2**64 - 1  # a 64-bit id whose varint takes the most bytes (10)


def payload_bytes(record: ArrayRecord) -> int:
    """Raw tensor bytes of an ArrayRecord (no headers, no key names)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


def wire_bytes(message: Message) -> int:
    """Serialized size of a Flower message: the sum of the serialized lengths of all its objects.

    Flower sends a message as content-addressed objects (the message, its RecordDict, each record,
    each Array and its chunks); this is what travels between SuperLink and SuperNode, without the
    transport's own framing (gRPC/HTTP headers, polling, heartbeats).
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def bundle_download_bytes(run: Run) -> int | None:
    """Bytes of the app bundle that each SuperNode downloads once per run: the serialized reply to
    its ``GetFab`` request (the FAB and its hash; transport framing aside, as in :func:`wire_bytes`).

    The ServerApp never sees the FAB itself, only the app the SuperLink installed from it under
    ``FLWR_HOME``; Flower's builder is deterministic, so the FAB is rebuilt from that directory and
    counted only if its SHA-256 is the run's ``fab_hash``. None in a simulation (no FAB) or when
    the rebuilt bundle is not the run's.
    """
    if not run.fab_hash:
        return None
    return fab_reply_bytes(run, lambda content: hashlib.sha256(content).hexdigest())


def _canonical_deflate(message: Message) -> bytes:
    """``message.deflate()`` with every random 64-bit id set to the widest value (as Message.deflate
    builds it: metadata without message_id, error if any, object header)."""
    proto = metadata_to_proto(message.metadata)
    proto.message_id = ""
    for name in RANDOM_ID_FIELDS:
        value = getattr(proto, name)
        if value and not (name.endswith("node_id") and value == SUPERLINK_NODE_ID):
            setattr(proto, name, WIDEST_ID)
    error = error_to_proto(message.error) if message.has_error() else None
    body = ProtoMessage(metadata=proto, content=None, error=error).SerializeToString(deterministic=True)
    return add_header_to_object_body(object_body=body, obj=message)


def accounted_wire_bytes(message: Message) -> int:
    """:func:`wire_bytes` with the random 64-bit ids counted at full width.

    A message's metadata carries the run id, node ids and task ids as protobuf varints, whose
    length (1 to 10 bytes) depends on the random values a run happens to draw; counting each at
    the widest makes the byte count a function of the run's settings and seed, so a rerun or a
    resumed run counts exactly the same bytes. This overstates a real message by at most a few
    bytes per id. The SuperLink's node id is a constant and counted as it is.
    """
    return wire_bytes(message) - len(message.deflate()) + len(_canonical_deflate(message))


def train_replies(records: list[ArrayRecord], examples: list[object]) -> list[Message]:
    """Offline train replies, one per record, from nodes 1, 2, ... with ``examples`` as their
    num-examples (as a ClientApp would reply; for tests of aggregation)."""
    offline_task_identity()
    replies = []
    for node, (record, num) in enumerate(zip(records, examples, strict=True), start=1):
        down = Message(RecordDict({CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
        metrics = MetricRecord({NUM_EXAMPLES: num, TRAIN_LOSS: 1.0, TRAIN_ACCURACY: 0.5, TRAIN_SECONDS: 1.0})
        replies.append(Message(RecordDict({ARRAYS: record, METRICS: metrics}), reply_to=down))
    return replies


# The placement record of a reply from a client run by Ray on a CPU without a GPU share: a node id of
# Ray's width (a deployed SuperNode's reply names no node and is NODE_ID_HEX_LENGTH bytes shorter),
# "cpu" and CUDA_VISIBLE_DEVICES "" (a client on a GPU names it, e.g. "cuda:0 NVIDIA H100 80GB HBM3", "0").
SIMULATED_PLACEMENT = ConfigRecord({NODE_ID_KEY: "0" * NODE_ID_HEX_LENGTH, DEVICE_KEY: "cpu", VISIBLE_KEY: ""})
UPDATE_SCALE = 1e-3  # std of the offline update that `round_messages` encodes (a small, non-zero step)


def _moved(record: ArrayRecord, floating: list[str], rng: np.random.Generator) -> ArrayRecord:
    """``record`` with its floating entries moved by seeded noise of std :data:`UPDATE_SCALE`."""
    return ArrayRecord(
        {
            key: Array((a.numpy() + rng.normal(0, UPDATE_SCALE, a.shape)).astype(a.numpy().dtype))
            if key in floating
            else a
            for key, a in record.items()
        }
    )


def round_messages(
    cfg: RunConfig, node_id: int = 1, *, resync: bool = False, model: nn.Module | None = None
) -> tuple[Message, Message]:
    """The train message a client receives and the reply it sends, as CSGFedAvg and the ClientApp
    build them in a simulation (same records, keys and metrics, downlink as the arm's).

    The reply of an arm with a codec is the real encoding of a non-zero update: the received
    payload's float entries moved by seeded noise of std :data:`UPDATE_SCALE`. For a delta
    downlink the message is that of a node in sync (the compressed change between two broadcasts,
    the global model moved by such noise), or with ``resync`` that of a node sent x̂ in full.
    ``model`` is the arm's initial model if already built.
    """
    offline_task_identity()
    model = model if model is not None else build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    arrays = model_payload(model, layout)
    rng = np.random.default_rng(cfg.seed)
    broadcaster = Broadcaster(Downlink.of_config(cfg, layout))
    received = broadcaster.prepare(arrays)
    if broadcaster.downlink.is_delta and not resync:
        broadcaster.held[node_id] = broadcaster.version
        received = broadcaster.prepare(_moved(arrays, layout.floating_keys(), rng))
    group = broadcaster.groups([node_id])[0]
    # The run's instruction of round 1, without the arm and seed (the bytes of a run of its own)
    instruction = TrainInstruction(cfg.local_epochs, cfg.batch_size, server_round=1, lr=cfg.lr, downlink=group.sync)
    down = Message(
        RecordDict({ARRAYS: group.record, CONFIG: instruction.record()}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )
    local = _moved(received, layout.floating_keys(), rng)
    reply, _ = Uplink(layout, cfg.codec).encode(local, received, None, rng)
    version = broadcaster.version if broadcaster.downlink.is_delta else None
    metrics = TrainReply(5000, 1.0, 0.5, 1.0, partition_id=0, downlink_version=version).record()
    up = Message(RecordDict({ARRAYS: reply, METRICS: metrics, PLACEMENT: SIMULATED_PLACEMENT}), reply_to=down)
    return down, up


def arm_traffic(cfg: RunConfig, clients_per_round: int, settings: ModelSettings | None = None) -> dict:
    """Payload and wire bytes of one round of ``cfg.arm`` with ``clients_per_round`` clients, of the
    arm's model as ``settings`` describe it (e.g. of another class count than the run's data set's;
    default: the run's, :meth:`~fedcsg.spec.config.RunConfig.model_settings`)."""
    model = settings.build() if settings is not None else build_arm_model(cfg)
    down, up = round_messages(cfg, model=model)
    resync = round_messages(cfg, resync=True, model=model)[0] if cfg.downlink_mode not in STATELESS else down
    payload_down = payload_bytes(down.content[ARRAYS])
    payload_up = payload_bytes(up.content[ARRAYS])
    return {
        "arm": cfg.arm,
        "downlink": cfg.downlink_mode,
        "parameters_sendable": count_parameters(model).sendable,
        "tensors": len(payload_layout(cfg, model).entries),
        "arrays_per_message": len(up.content[ARRAYS]),
        "payload_per_client": payload_up,
        "payload_down_per_client": payload_down,
        "wire_up_per_client": accounted_wire_bytes(up),
        "wire_down_per_client": accounted_wire_bytes(down),
        "wire_down_resync_per_client": accounted_wire_bytes(resync),
        "payload_up": payload_up * clients_per_round,
        "payload_down": payload_down * clients_per_round,
        "wire_up": accounted_wire_bytes(up) * clients_per_round,
        "wire_down": accounted_wire_bytes(down) * clients_per_round,
    }
