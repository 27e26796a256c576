"""The fedcsg ClientApp: trains the arm's model on its partition and replies with the arm's payload.

The same app runs in simulation (Flower's simulation engine on Ray) and on real SuperNodes: the
partition comes from the node config (``partition-id``, ``num-partitions``), the data location
from the node config's ``data-dir`` when given, else from the run config or $FEDCSG_DATA_DIR. A
node whose config names a ``data-dir`` and no partition trains on all of that folder's train split,
its own data (a device); a model its data does not fit (other classes or channels) is refused in
one line. A node whose installed fedcsg is not the server's (the run config's ``fedcsg-version``,
from the app bundle's pyproject) refuses to train, in one line naming both.
It only trains: evaluation is server-side, on the test split (the strategy sends no evaluate
messages). An arm with a codec (``csg+int8``) replies with its encoded update
(:class:`~fedcsg.wire.uplink.Uplink`); a codec with error feedback keeps the part it did not send
in the node's ``Context.state`` and adds it to its next update. That residual lives as long as
the node's context: a resumed run starts it again from zero. An arm with a delta downlink
(``csg+int8/delta-int8``) keeps the model it holds, x̂, in ``Context.state`` too
(:func:`fedcsg.wire.downlink.receive`), and its reply says which version it holds.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from torch import nn

from fedcsg.fl.privacy import client_mod, on_floating_entries
from fedcsg.fl.ray_cluster import PLACEMENT, hide_gpus_without_share, placement_record
from fedcsg.fl.run_data import client_data, local_data
from fedcsg.fl.task import build_arm_model, local_train, payload_layout, round_layout
from fedcsg.nn.determinism import set_deterministic
from fedcsg.nn.devices import describe
from fedcsg.nn.training import get_device
from fedcsg.spec.config import INSTALLED_VERSION, RunConfig
from fedcsg.wire.downlink import Downlink, receive
from fedcsg.wire.handoff import received_handoff
from fedcsg.wire.messages import ARRAYS, CONFIG, METRICS, PARTITION_ID, TrainInstruction, TrainReply, VersionMismatch
from fedcsg.wire.payload import PayloadLayout, load_entries, load_payload, model_payload
from fedcsg.wire.uplink import Uplink


def dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The run's client-side DP (``dp`` = client-fixed or local: Flower's mod, :func:`fedcsg.fl.privacy.client_mod`)
    on the payload's floating entries; every other mode calls the app as it is."""
    mod = client_mod(client_config(context))
    return call_next(msg, context) if mod is None else on_floating_entries(mod, msg, context, call_next)


app = ClientApp(mods=[dp_mod])
RESIDUAL_KEY = "uplink-residual"  # Context.state record of an error-feedback codec's residual


@functools.lru_cache(maxsize=2)
def _model_and_layout(cfg: RunConfig) -> tuple[nn.Module, PayloadLayout, nn.Module | None]:
    # One model per process and run: a Ray actor serves many virtual clients in turn, and each
    # round overwrites every payload entry, so rebuilding it per message would only cost time; its
    # compiled twin (when the run compiles) is kept with it, so a process compiles once per run.
    model = build_arm_model(cfg)
    device = get_device(cfg.device)
    return model, payload_layout(cfg, model), cfg.execution(device.type).compiled(model, device)


class InjectedFault(RuntimeError):
    """The failure ``fault-probability`` injects into a client's round."""


class DataMismatch(ValueError):
    """A device's own data does not fit the run's model (other classes or image channels)."""


def check_version(cfg: RunConfig, installed: str = INSTALLED_VERSION) -> None:
    """Refuse a run whose server runs another fedcsg than this node (``installed``): the app bundle
    carries no code, so each node runs the fedcsg installed on it.

    Raises
    ------
    VersionMismatch
        One line naming both versions.
    """
    if cfg.fedcsg_version != installed:
        raise VersionMismatch.of(installed, cfg.fedcsg_version)


def node_partition(context: Context) -> tuple[int, int] | None:
    """This node's ``(partition-id, num-partitions)``, or None for a device with its own data: a node
    config with a ``data-dir`` and no ``partition-id``."""
    config = context.node_config
    if PARTITION_ID in config and "num-partitions" in config:
        return int(config[PARTITION_ID]), int(config["num-partitions"])
    if PARTITION_ID not in config and config.get("data-dir"):
        return None
    raise ValueError(
        f"node config {dict(config)!r} is not accepted: accepted are data-dir (a device's own data) or "
        "partition-id and num-partitions"
    )


def data_mismatch(cfg: RunConfig, error: Exception) -> DataMismatch:
    """The one-line refusal of a device whose own data (``cfg``'s, the node's ``data-dir``) built a
    model the run's payload does not fit (``error``)."""
    spec = cfg.dataset_spec()
    return DataMismatch(
        f"this node's data-dir {cfg.data_dir!r} holds {spec.num_classes} classes of {spec.in_channels}-channel "
        f"images, which the run's model does not fit ({error}); accepted are images of the run's classes and channels"
    )


def injected_fault(seed: int, server_round: int, partition_id: int, probability: float, attempt: int = 0) -> bool:
    """Whether the client of ``partition_id`` fails ``server_round`` under fault injection.

    Drawn from ``(seed, server_round, partition_id)`` (and the attempt, when a failed round is
    retried), never from a generator with history, so a rerun or a resumed run fails the same
    clients in the same rounds.
    """
    if probability <= 0:
        return False
    key = (seed, server_round, partition_id) if attempt == 0 else (seed, server_round, partition_id, attempt)
    return bool(np.random.default_rng(key).random() < probability)


def carried_residual(context: Context, key: str) -> np.ndarray | None:
    """The residual this node's error-feedback codec carried from its last round (in the state
    record ``key``, :func:`residual_key`), if any."""
    if key not in context.state:
        return None
    record = context.state[key]
    assert isinstance(record, ArrayRecord)
    return record["residual"].numpy()


@functools.lru_cache(maxsize=8)
def _parsed_run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    # Parsed and checked once per process and run config, not once per message: a Ray actor serves
    # every message of a simulation's runs, whose run config is the same (RunConfig is frozen).
    return RunConfig.from_mapping(dict(items))


def client_config(context: Context, instruction: TrainInstruction | None = None) -> RunConfig:
    """The run config of this node's message: the run config, with the arm and seed that the train
    ``instruction`` names (one simulation may run several arms and seeds in turn) and the node's own
    ``data-dir`` when it has one."""
    cfg = _parsed_run_config(tuple(sorted(context.run_config.items())))
    if instruction is not None and instruction.arm:
        seed = cfg.seed if instruction.seed is None else instruction.seed
        cfg = cfg.replace(arm=instruction.arm, seed=seed)
    node_data_dir = context.node_config.get("data-dir")
    return cfg.replace(data_dir=str(node_data_dir)) if node_data_dir else cfg


def residual_key(cfg: RunConfig, layout: PayloadLayout) -> str:
    """The ``Context.state`` record of the error-feedback residual of ``cfg``'s run on this node:
    one per arm and seed, as one node serves every run of a simulation, and per payload (a csg-warm
    arm's residual starts again when its generator leaves the payload)."""
    return f"{RESIDUAL_KEY}:{cfg.arm}:{cfg.seed}" + (":held" if layout.held else "")


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    assert isinstance(config, ConfigRecord)
    instruction = TrainInstruction.of_record(config)
    cfg = client_config(context, instruction)
    check_version(cfg)
    partition = node_partition(context)
    # A device with its own data draws its faults, shuffles and codec noise from its node id.
    partition_id = context.node_id % 2**31 if partition is None else partition[0]
    server_round, attempt = instruction.server_round, instruction.attempt
    if injected_fault(cfg.seed, server_round, partition_id, cfg.fault_probability, attempt):
        client = f"node {context.node_id}" if partition is None else f"partition {partition_id}"
        raise InjectedFault(
            f"injected fault: {client}, round {server_round}, attempt {attempt} "
            f"(fault-probability = {cfg.fault_probability})"
        )
    hide_gpus_without_share(cfg)  # before CUDA starts in this process
    set_deterministic(cfg.deterministic)
    device = get_device(cfg.device)
    model, whole, compiled = _model_and_layout(cfg)
    layout = round_layout(cfg, model, server_round)  # a csg-warm arm's frozen generator: handed off, not sent
    run = f"{cfg.arm}:{cfg.seed}"
    # What a node keeps lives in context.state (a delta downlink's x̂, a frozen generator handed off);
    # out of sync, these raise and the round fails.
    held = received_handoff(msg.content, instruction.handoff_hash, context.state, run)
    if held is not None:
        load_entries(model, held, whole.subset(layout.held))
    downlink = Downlink.of_config(cfg, layout)
    try:
        received = receive(downlink, msg.content[ARRAYS], instruction.downlink, context.state, run)
        load_payload(model, received, layout)
    except ValueError as error:
        if partition is None:  # the model was built from the node's own data: its classes or channels
            raise data_mismatch(cfg, error) from None
        raise
    stats = local_train(
        model,
        local_data(cfg) if partition is None else client_data(cfg, *partition),
        cfg,
        lr=instruction.lr,
        epochs=instruction.local_epochs,
        batch_size=instruction.batch_size,
        seed=cfg.seed * 1_000_003 + server_round * 10_007 + partition_id,
        device=device,
        factor=instruction.train_factor or "all",
        compiled=compiled,
    )
    # The model stays on its device for the process's next client (a CUDA graph keeps its addresses).
    metrics = TrainReply(
        num_examples=stats.num_examples,
        train_loss=stats.loss,
        train_accuracy=stats.accuracy,
        train_seconds=stats.seconds,
        partition_id=None if partition is None else partition_id,
        downlink_version=instruction.downlink.version if instruction.downlink else None,
        handoff_hash=instruction.handoff_hash if held is not None else None,
    ).record()
    residual_at = residual_key(cfg, layout)
    arrays, residual = Uplink(layout, cfg.codec).encode(
        model_payload(model, layout),
        received,
        carried_residual(context, residual_at),
        np.random.default_rng((cfg.seed, server_round, partition_id, attempt)),
    )
    if residual is not None:
        context.state[residual_at] = ArrayRecord({"residual": Array(residual)})
    placement = ConfigRecord(placement_record(describe(device)))
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics, PLACEMENT: placement}), reply_to=msg)
