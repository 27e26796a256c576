"""Constructed round records for report tests: every field of a successful round (or round 0)."""

from __future__ import annotations

from typing import Any

from fedcsg.runs.records import ROUND_FIELDS


def round_record(
    rnd: int, accuracy: float, *, loss: float = 1.0, up: int = 100, down: int = 200, **fields: Any
) -> dict:
    """Round ``rnd`` of two clients that both replied: ``up`` / ``down`` bytes (payload and wire alike,
    0 in round 0), test ``accuracy`` and ``loss``; ``fields`` override or add any other field."""
    record: dict[str, Any] = {k: None for k in ROUND_FIELDS}
    record.update(
        round=rnd,
        test_accuracy=accuracy,
        test_loss=loss,
        sampled=2,
        replied=2,
        failed=0,
        rejected=0,
        partitions=[0, 1],
        failed_partitions=[],
        status="ok" if rnd else "initial",
        attempts=1,
        payload_up=up if rnd else 0,
        payload_down=down if rnd else 0,
        wire_up=up if rnd else 0,
        wire_down=down if rnd else 0,
        seconds=1.0 if rnd else 0.0,
    )
    record.update(fields)
    return record
