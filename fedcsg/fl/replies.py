"""What a client's train reply must be before it is averaged: its arrays checked against the arm's
payload layout and codec (keys, shapes, dtypes, finite values), the size of its update, and the
round's averaged train metrics."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcsg.wire.messages import TRAIN_ACCURACY, TRAIN_LOSS, TRAIN_METRICS, TRAIN_SECONDS, WEIGHT_KEY
from fedcsg.wire.payload import check_specs
from fedcsg.wire.uplink import Uplink


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Loss and accuracy averaged by num-examples; examples summed; local seconds as the slowest client."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(int(m[weight_key]) for m in metrics)
    out = MetricRecord({weight_key: total})
    for key in (TRAIN_LOSS, TRAIN_ACCURACY):
        out[key] = sum(float(m[key]) * int(m[weight_key]) for m in metrics) / max(total, 1)
    out[TRAIN_SECONDS] = max(float(m[TRAIN_SECONDS]) for m in metrics)
    return out


def update_norm(record: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``record - reference`` over the floating-point entries (float64 sums)."""
    total = 0.0
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and key in reference:
            delta = values.astype(np.float64) - reference[key].numpy().astype(np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def checked_reply(
    reply: Message,
    uplink: Uplink,
    reference: ArrayRecord | None = None,
    max_update_norm: float = 0.0,
) -> tuple[ArrayRecord | None, str | None]:
    """The payload a train reply stands for and None, or None and why it cannot be aggregated.

    Checks, in order: one ArrayRecord and one MetricRecord; num-examples a positive integer; the
    train metrics finite numbers; the record's keys, shapes and dtypes exactly what the arm's
    clients send (:meth:`~fedcsg.wire.uplink.Uplink.specs`: the payload, or the codec's encoded
    update); every float value finite; then it is decoded against ``reference`` (the global
    payload as the client received it), which must succeed and give finite values; and, when
    ``max_update_norm`` > 0, the L2 norm of the decoded update is at most ``max_update_norm``.
    """
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return None, "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(WEIGHT_KEY)
    if not isinstance(examples, int) or isinstance(examples, bool) or examples <= 0:
        return None, f"{WEIGHT_KEY} must be a positive integer, got {examples!r}"
    for key in TRAIN_METRICS:
        value = metrics.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return None, f"metric {key!r} must be a finite number, got {value!r}"
    record = next(iter(content.array_records.values()))
    try:
        check_specs(record, uplink.specs())
    except ValueError as error:
        return None, str(error)
    problem = _non_finite(record, "")
    if problem is not None:
        return None, problem
    if uplink.codec is not None:
        if reference is None:
            return None, "an encoded update cannot be decoded without the payload it was computed from"
        try:
            record = uplink.decode(record, reference)
        except ValueError as error:
            return None, f"{uplink.codec.name} update does not decode: {error}"
        problem = _non_finite(record, "decoded ")
        if problem is not None:
            return None, problem
    if max_update_norm > 0 and reference is not None:
        norm = update_norm(record, reference)
        if norm > max_update_norm:
            return None, f"update norm {norm:.6g} exceeds max-update-norm = {max_update_norm:g}"
    return record, None


def _non_finite(record: ArrayRecord, what: str) -> str | None:
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{what}payload entry {key!r} has non-finite values"
    return None
