"""CSGFedAvg: Flower's FedAvg with exact, dtype-preserving averaging over the arm's payload, reply
checks, a per-round learning rate, and byte accounting in both directions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedcsg.payload import PayloadLayout, check_record, payload_bytes, weighted_average, wire_bytes

WEIGHT_KEY = "num-examples"


@dataclass
class RoundTraffic:
    """What crossed the network in one round, summed over the sampled clients.

    Byte counts are sums over messages, never averaged by num-examples.
    """

    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    partitions: list[int] = field(default_factory=list)
    payload_down: int = 0
    wire_down: int = 0
    payload_up: int = 0
    wire_up: int = 0
    started: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("started")
        return out


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Loss and accuracy averaged by num-examples; examples summed; local seconds as the slowest client."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(int(m[weight_key]) for m in metrics)
    out = MetricRecord({weight_key: total})
    for key in ("train-loss", "train-accuracy"):
        out[key] = sum(float(m[key]) * int(m[weight_key]) for m in metrics) / max(total, 1)
    out["train-seconds"] = max(float(m["train-seconds"]) for m in metrics)
    return out


def reply_problem(reply: Message, layout: PayloadLayout) -> str | None:
    """Why a train reply cannot be aggregated, or None if it can."""
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(WEIGHT_KEY)
    if not isinstance(examples, int) or isinstance(examples, bool) or examples <= 0:
        return f"{WEIGHT_KEY} must be a positive integer, got {examples!r}"
    record = next(iter(content.array_records.values()))
    try:
        check_record(record, layout)
    except ValueError as error:
        return str(error)
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"payload entry {key!r} has non-finite values"
    return None


class CSGFedAvg(FedAvg):
    """FedAvg over a :class:`~fedcsg.payload.PayloadLayout`, with traffic accounting.

    Parameters
    ----------
    layout
        The arm's payload: every reply must match it key for key, shape for shape, dtype for
        dtype, with finite values and a positive integer num-examples, or it is rejected.
    lr_fn
        Learning rate of a round (``server_round -> lr``), sent in the train config.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimum nodes).
    """

    def __init__(self, layout: PayloadLayout, *, lr_fn: Callable[[int], float], **fedavg_kwargs) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)  # evaluation is server-side, on the test split
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        super().__init__(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs)
        self.layout = layout
        self.lr_fn = lr_fn
        self.traffic: dict[int, RoundTraffic] = {}
        self.train_metrics: dict[int, MetricRecord] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic(started=time.perf_counter()))
        round_config = ConfigRecord({**config, "lr": float(self.lr_fn(server_round))})
        messages = list(super().configure_train(server_round, arrays, round_config, grid))
        traffic.sampled = len(messages)
        traffic.payload_down = payload_bytes(arrays) * len(messages)
        traffic.wire_down = sum(wire_bytes(m) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic(started=time.perf_counter()))
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        traffic.failed = len(errors)
        traffic.replied = len(valid)
        accepted: list[Message] = []
        for reply in valid:
            traffic.wire_up += wire_bytes(reply)
            traffic.payload_up += sum(payload_bytes(r) for r in reply.content.array_records.values())
            problem = reply_problem(reply, self.layout)
            if problem is not None:
                traffic.rejected += 1
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    problem,
                )
                continue
            accepted.append(reply)
            metrics = next(iter(reply.content.metric_records.values()))
            if "partition-id" in metrics:
                traffic.partitions.append(int(metrics["partition-id"]))
        traffic.partitions.sort()
        if not accepted:
            return None, None
        contents = [r.content for r in accepted]
        weights = [int(next(iter(c.metric_records.values()))[WEIGHT_KEY]) for c in contents]
        arrays = weighted_average([next(iter(c.array_records.values())) for c in contents], weights)
        metrics = self.train_metrics_aggr_fn(contents, WEIGHT_KEY)
        self.train_metrics[server_round] = metrics
        return arrays, metrics


def lr_schedule(base_lr: float, schedule: str, num_rounds: int) -> Callable[[int], float]:
    """``server_round -> lr`` (rounds count from 1): constant, the paper's step schedule
    (x0.1 at 50% and x0.01 at 75% of the rounds) or cosine to zero."""
    from fedcsg.training import step_lr

    return lambda server_round: step_lr(base_lr, server_round - 1, num_rounds, schedule)
