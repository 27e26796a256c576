"""The message schema both sides spell: the records of a train message and of its reply, every key
of the train message's config (:class:`TrainInstruction`) and of the reply's metrics
(:class:`TrainReply`), each named here once.

A train message carries ``{ARRAYS: payload, CONFIG: instruction}`` (and, for a csg-warm arm after
its freeze, ``HANDOFF``: the arrays a node is handed once, :mod:`fedcsg.wire.handoff`); a client's
reply carries ``{ARRAYS: update, METRICS: metrics}`` (and, in fedcsg.fl.ray_cluster, its placement).
The aggregation weight of a reply is its ``NUM_EXAMPLES`` metric, as Flower's FedAvg reads it
(``weighted_by_key``). ``PARTITION_ID`` is also the node-config key under which Flower's simulation
engine gives each virtual client its partition.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
HANDOFF = "handoff"  # the train message's record of the handed-off arrays (fedcsg.wire.handoff)

# -- the train message's config (TrainInstruction) -------------------------------------------------
SERVER_ROUND = "server-round"
ATTEMPT = "attempt"  # 0, or 1 when a failed round is sent once more (failed-round = retry)
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
RUN_ARM, RUN_SEED = "arm", "seed"  # the run a message belongs to (one simulation may hold several)
TRAIN_FACTOR = "train-factor"  # which CSG factor trains (fedcsg.nn.csg_factors.FACTORS)
DOWNLINK_KIND, DOWNLINK_BASE = "downlink-kind", "downlink-base"
DOWNLINK_VERSION, DOWNLINK_HASH = "downlink-version", "downlink-hash"  # also a reply metric: DOWNLINK_VERSION
HANDOFF_HASH = "handoff-hash"  # the hash of the arrays every node must hold; also a reply metric

# -- the reply's metrics (TrainReply) ----------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # the aggregation weight (FedAvg's weighted_by_key)
WEIGHT_KEY = NUM_EXAMPLES
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
PARTITION_ID = "partition-id"
TRAIN_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, TRAIN_SECONDS)  # averaged over the replies of a round
TEST_ACCURACY = "test-accuracy"  # the server-side evaluation of a round (its evaluate_fn's metrics)
TEST_LOSS = "test-loss"


@dataclass(frozen=True)
class DownlinkSync:
    """A delta downlink's part of a train message (:mod:`fedcsg.wire.downlink`): whether the arrays
    are a ``delta`` against version ``base`` or x̂ in ``full``, and the ``version`` and ``digest``
    (hash) of the x̂ the client holds after it."""

    kind: str
    base: int
    version: int
    digest: str


@dataclass(frozen=True)
class TrainInstruction:
    """What a train message tells its client besides the arrays: the entries of its config record.

    The server writes it (:meth:`record`): the run's (round 0, from its RunConfig), which the strategy
    fills in each round; the client reads it (:meth:`of_record`) and trains by it alone:
    ``local-epochs`` and ``batch-size`` come from here, not from the client's own run config.
    ``arm`` and ``seed`` name the run ("" and None: the client's run config's, as in an offline
    message of ``fedcsg bytes``), ``train_factor`` the CSG factor that trains ("": all),
    ``downlink`` a delta downlink's versions and ``handoff_hash`` the handed-off arrays a node must
    hold (None: neither).
    """

    local_epochs: int
    batch_size: int
    server_round: int = 0
    lr: float = 0.0
    attempt: int = 0
    arm: str = ""
    seed: int | None = None
    train_factor: str = ""
    downlink: DownlinkSync | None = None
    handoff_hash: int | None = None

    def record(self) -> ConfigRecord:
        """The config record of the message (an entry left unset is left out)."""
        entries: dict[str, Any] = {
            LOCAL_EPOCHS: self.local_epochs,
            BATCH_SIZE: self.batch_size,
            **({RUN_ARM: self.arm} if self.arm else {}),
            **({RUN_SEED: self.seed} if self.seed is not None else {}),
            LR: float(self.lr),
            ATTEMPT: self.attempt,
            SERVER_ROUND: self.server_round,
            **({TRAIN_FACTOR: self.train_factor} if self.train_factor else {}),
        }
        if self.downlink is not None:
            sync = self.downlink
            entries |= {DOWNLINK_VERSION: sync.version, DOWNLINK_HASH: sync.digest, DOWNLINK_BASE: sync.base}
            entries[DOWNLINK_KIND] = sync.kind
        if self.handoff_hash is not None:
            entries[HANDOFF_HASH] = self.handoff_hash
        return ConfigRecord(entries)

    @classmethod
    def of_record(cls, config: ConfigRecord) -> TrainInstruction:
        """The instruction a train message's config record holds.

        Raises
        ------
        ValueError
            One line naming a missing entry.
        """
        missing = [key for key in (LOCAL_EPOCHS, BATCH_SIZE, SERVER_ROUND, LR) if key not in config]
        if missing:
            raise ValueError(f"the train message's config lacks {', '.join(missing)}")
        sync = None
        if DOWNLINK_VERSION in config:
            sync = DownlinkSync(
                str(config[DOWNLINK_KIND]),
                int(config[DOWNLINK_BASE]),
                int(config[DOWNLINK_VERSION]),
                str(config[DOWNLINK_HASH]),
            )
        return cls(
            server_round=int(config[SERVER_ROUND]),
            lr=float(config[LR]),
            local_epochs=int(config[LOCAL_EPOCHS]),
            batch_size=int(config[BATCH_SIZE]),
            attempt=int(config.get(ATTEMPT, 0)),
            arm=str(config.get(RUN_ARM, "")),
            seed=int(config[RUN_SEED]) if RUN_SEED in config else None,
            train_factor=str(config.get(TRAIN_FACTOR, "")),
            downlink=sync,
            handoff_hash=int(config[HANDOFF_HASH]) if HANDOFF_HASH in config else None,
        )

    def replace(self, **changes: Any) -> TrainInstruction:
        """This instruction with ``changes`` (field names)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainReply:
    """A client's train metrics, the reply's metric record: its examples (the aggregation weight),
    the last epoch's loss and accuracy, the seconds it trained, its partition (None: a device that
    trains on its own data), and what it now holds: a delta downlink's x̂ version and the hash of the
    handed-off arrays (None: nothing)."""

    num_examples: int
    train_loss: float
    train_accuracy: float
    train_seconds: float
    partition_id: int | None
    downlink_version: int | None = None
    handoff_hash: int | None = None

    def record(self) -> MetricRecord:
        """The metric record of the reply (an entry left unset is left out)."""
        return MetricRecord(
            {
                NUM_EXAMPLES: self.num_examples,
                TRAIN_LOSS: self.train_loss,
                TRAIN_ACCURACY: self.train_accuracy,
                TRAIN_SECONDS: self.train_seconds,
                **({PARTITION_ID: self.partition_id} if self.partition_id is not None else {}),
                **({DOWNLINK_VERSION: self.downlink_version} if self.downlink_version is not None else {}),
                **({HANDOFF_HASH: self.handoff_hash} if self.handoff_hash is not None else {}),
            }
        )


def reply_metrics(reply: Message) -> MetricRecord | None:
    """The one metric record of a reply, None if it has none or several (a reply the server rejects)."""
    records = reply.content.metric_records
    return next(iter(records.values())) if len(records) == 1 else None


def acknowledged(sent: Iterable[int], replies: Iterable[Message], key: str, value: int) -> tuple[set[int], set[int]]:
    """(the ``sent`` nodes whose reply's metric ``key`` is ``value``, the other ``sent`` nodes: failed,
    silent or holding something else), as the server settles what each node holds after a round."""
    said = set()
    for reply in replies:
        metrics = reply_metrics(reply)
        if metrics is not None and metrics.get(key) == value:
            said.add(reply.metadata.src_node_id)
    sent = set(sent)
    return sent & said, sent - said


class VersionMismatch(RuntimeError):
    """This node's fedcsg is not the version the server runs: the one line that says so travels back
    as the reply's error, and the server recognises it there (:meth:`versions_in`): both sides spell it here."""

    PATTERN = re.compile(r"fedcsg version mismatch: this node runs fedcsg (.+?), the server fedcsg (.+?); install ")

    @classmethod
    def of(cls, node: str, server: str) -> VersionMismatch:
        """The refusal of a node that runs fedcsg ``node`` under a server that runs ``server``."""
        return cls(
            f"fedcsg version mismatch: this node runs fedcsg {node}, the server fedcsg {server}; "
            f"install fedcsg {server} on this node"
        )

    @classmethod
    def versions_in(cls, reason: str) -> tuple[str, str] | None:
        """``(node's version, server's version)`` when a reply's error ``reason`` is this refusal."""
        match = cls.PATTERN.search(reason)
        return None if match is None else (match.group(1), match.group(2))
