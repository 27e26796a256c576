"""The round record, the one schema of what a run records per round, and where a run's records live.

Layout of an output directory::

    DIR/arms/<arm>.json      written by the ServerApp after every round (atomic rename)
    DIR/state/<arm>.json     the arm's checkpoint after its last complete round (see fedcsg.runs.checkpoint)
    DIR/state/<arm>-round-NNNN.safetensors   the global payload of that round
    DIR/results.json, results.csv, report.md and plots   the report (see fedcsg.runs.report)

A run over several seeds (``seeds`` = "0,1,2") holds one such run per seed in ``DIR/seed-N/``.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcsg.io import atomic_write_text, check_schema, read_json_object, strict_json
from fedcsg.runs.layout import arm_record_path
from fedcsg.spec.arms import file_stem
from fedcsg.spec.checks import shown
from fedcsg.spec.config import fedcsg_version

BYTE_FIELDS = ("payload_up", "payload_down", "wire_up", "wire_down")


@dataclass
class RoundRecord:
    """One round of one arm: what the server measured and what crossed the network.

    The strategy builds it: the traffic fields while the round runs, then, once the round is
    evaluated, the train metrics, lr and evaluation (:meth:`~fedcsg.fl.strategy.CSGFedAvg.finished_round`);
    it hands the finished record to the arm's :class:`ArmRecorder`, which adds the cumulative byte
    counts and alone writes it; :data:`ROUND_FIELDS` (the columns of arms/ARM.json and results.csv) are its fields.

    Byte counts are sums over messages, never averaged by num-examples. ``sampled`` = ``replied``
    + ``failed`` (a client that raised, timed out or vanished has failed); ``rejected`` counts the
    replies that arrived but failed the checks; ``partitions`` are the clients whose updates were
    aggregated, ``failed_partitions`` those that failed (as far as the server can tell which
    partition a node serves), ``version_mismatch`` the node ids among them that refused the round
    because they run another fedcsg than the server; ``ray_nodes`` names the Ray node that ran each of ``partitions``'
    clients, in the same order ("" where it ran outside Ray, as on a deployed SuperNode), ``devices``
    the device each trained on (``cpu``, or ``cuda:N`` and the device's name) and ``visible_devices``
    the ``CUDA_VISIBLE_DEVICES`` each saw (Ray's GPU ids for its share; "" none, ``unset``). ``status``
    is ``initial`` (round 0), ``ok``, or ``failed`` when fewer
    than the minimum of replies were accepted in every attempt and the global model was kept;
    ``first_error`` is the first client failure or rejection of the round, on one line (None if none).
    ``resynced`` counts the sampled nodes of a delta downlink that were sent x̂ in full (not known
    to hold the previous one) and ``wire_down_resync`` their share of ``wire_down``; the in-sync
    nodes' share is the rest. ``started`` (when the round began, ``time.perf_counter``) is not recorded.

    The filter step (:func:`fedcsg.nn.step.round_step`), over all conv filters (generated
    ones for CSG layers, FedPara's products, plain weights) and measured on the decoded payloads the
    server averages: ``filter_step`` is ``|W_after - W_before| / |W_before|`` of the global filters
    over the round, ``client_filter_step`` the mean over the aggregated replies of the same from the
    filters a client started from to its filters after local training; None where no round was
    aggregated (round 0, a failed round).

    ``epsilon`` is the privacy accountant's epsilon spent after the round (run setting ``dp``, at
    ``dp-target-delta``; :mod:`fedcsg.fl.privacy`); None without DP.
    """

    round: int
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    lr: float | None = None
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    partitions: list[int] = field(default_factory=list)
    ray_nodes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    visible_devices: list[str] = field(default_factory=list)
    failed_partitions: list[int] = field(default_factory=list)
    version_mismatch: list[int] = field(default_factory=list)
    status: str = "ok"
    first_error: str | None = None
    attempts: int = 0
    payload_up: int = 0
    payload_down: int = 0
    wire_up: int = 0
    wire_down: int = 0
    resynced: int = 0
    wire_down_resync: int = 0
    cum_payload_up: int = 0
    cum_payload_down: int = 0
    cum_wire_up: int = 0
    cum_wire_down: int = 0
    seconds: float | None = None
    filter_step: float | None = None
    client_filter_step: float | None = None
    epsilon: float | None = None
    started: float = field(default=0.0, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The recorded fields (:data:`ROUND_FIELDS`), in order."""
        return {name: getattr(self, name) for name in ROUND_FIELDS}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RoundRecord:
        """From a recorded round (unknown keys, such as ``non_finite``, are left out)."""
        return cls(**{name: values[name] for name in ROUND_FIELDS if name in values})

    def after(self, previous: RoundRecord | Mapping[str, Any] | None) -> RoundRecord:
        """This record with the cumulative byte counts continued from ``previous`` (None: round 0)."""
        before = previous.as_dict() if isinstance(previous, RoundRecord) else dict(previous or {})
        return dataclasses.replace(
            self, **{f"cum_{key}": before.get(f"cum_{key}", 0) + getattr(self, key) for key in BYTE_FIELDS}
        )


ROUND_FIELDS = tuple(f.name for f in dataclasses.fields(RoundRecord) if f.name != "started")
# The JSON types of a recorded round (check_schema): every field but ``round`` may be absent or null
# (older records; a non-finite float is written as null).
_JSON_TYPES = {"int": int, "str": str, "float": float}


def _json_type(annotation: str) -> Any:
    """The check_schema type of a RoundRecord field's annotation (``list[int]``, ``float | None``, ...)."""
    base = annotation.removesuffix(" | None")
    if base.startswith("list["):
        return ([_JSON_TYPES[base.removeprefix("list[").removesuffix("]")]], None)
    return (_JSON_TYPES[base], None)


ROUND_SCHEMA = {
    "round": int,
    **{f"{f.name}?": _json_type(f.type) for f in dataclasses.fields(RoundRecord) if f.name not in ("round", "started")},
}
ARM_SCHEMA = {"arm?": str, "config": dict, "versions?": dict, "rounds": [ROUND_SCHEMA]}
# Fields that differ between two runs of the same config on the same data and seed: where and how
# long it ran. Everything else in a round's record is a function of the config.
RUN_SPECIFIC_FIELDS = ("seconds", "ray_nodes", "devices", "visible_devices")


def comparable(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded rounds without :data:`RUN_SPECIFIC_FIELDS`: equal for equal runs."""
    return [{k: v for k, v in r.items() if k not in RUN_SPECIFIC_FIELDS} for r in rounds]


class RunFailed(RuntimeError):
    """A run in which nothing worked: no round of an arm aggregated a client update, so its
    "final" model is the initial one. The message is one line naming the arm, the round and the
    first client error."""


def check_trained(arm: str, rounds: list[dict[str, Any]]) -> None:
    """Raise :class:`RunFailed` unless some round of ``arm`` (of the recorded ``rounds``) aggregated
    client updates: every client failed in every round, or too few replies were ever accepted."""
    trained = [r for r in rounds if r["round"] > 0]
    if not trained or any(r["status"] == "ok" for r in trained):
        return
    accepted = sum(r["replied"] - r["rejected"] for r in trained)
    failing = next((r for r in trained if r.get("first_error")), trained[0])
    reason = failing.get("first_error") or "no client was sampled"
    raise RunFailed(
        f"arm {arm!r} aggregated no client update in rounds {trained[0]['round']}..{trained[-1]['round']} "
        f"({accepted} replies accepted in all); round {failing['round']}: {reason}"
    )


# What a recorded value may be, beyond its JSON type: every number finite, these in [low, high], every
# other number (counts, bytes, seconds, lr, filter steps, losses) in [0, MAX_RECORDED].
MAX_RECORDED = 2**63 - 1
VALUE_RANGES = {"test_accuracy": (0.0, 1.0), "train_accuracy": (0.0, 1.0)}


def _check_values(rounds: list[dict[str, Any]], where: str) -> None:
    """A one-line ValueError naming the first recorded number that no run can produce."""
    for i, record in enumerate(rounds):
        for key, value in record.items():
            numbers = value if isinstance(value, list) else [value]
            for number in numbers:
                if not isinstance(number, int | float) or isinstance(number, bool):
                    continue
                low, high = VALUE_RANGES.get(key, (0, MAX_RECORDED))
                if not (math.isfinite(number) and low <= number <= high):
                    raise ValueError(
                        f"{where} is not a fedcsg record: rounds[{i}].{key} is {number!r}, accepted is a number "
                        f"in [{low}, {high:,}]"
                    )


def read_arm_record(path: Path) -> dict[str, Any]:
    """``DIR/arms/ARM.json``, checked against :data:`ARM_SCHEMA`, for rounds 0, 1, 2, ... in order,
    for values in range (:data:`VALUE_RANGES`) and for an ``arm`` that is the file's; a one-line
    ValueError naming the file and the field otherwise."""
    document = read_json_object(path)
    where = repr(str(path))
    check_schema(document, ARM_SCHEMA, where)
    numbers = [r["round"] for r in document["rounds"]]
    if numbers != list(range(len(numbers))):
        raise ValueError(f"{where} is not a fedcsg record: it records rounds {numbers[:8]}, not 0, 1, 2, ...")
    _check_values(document["rounds"], where)
    arm = document.get("arm", document["config"].get("arm"))
    if arm is not None and (not isinstance(arm, str) or file_stem(arm) != path.stem):
        raise ValueError(f"{where} is not a fedcsg record of arm {path.stem!r}: it records arm {shown(arm)}")
    return document


def versions() -> dict[str, str]:
    import flwr
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "fedcsg": fedcsg_version(),
    }


class ArmRecorder:
    """Collects one arm's round records and rewrites ``DIR/arms/<arm>.json`` after each round."""

    def __init__(self, out_dir: Path, arm: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        self.path = arm_record_path(out_dir, arm)
        self.arm = arm
        self.config = config
        self.extra = extra or {}
        self.rounds: list[dict[str, Any]] = []

    def add(self, record: RoundRecord | Mapping[str, Any], *, save: bool = True) -> dict[str, Any]:
        """Append a round record (cumulative byte counts are added here) and, if ``save``, rewrite the file."""
        record = record if isinstance(record, RoundRecord) else RoundRecord.from_mapping(record)
        previous = self.rounds[-1] if self.rounds else None
        if previous and record.round != previous["round"] + 1:
            raise ValueError(f"round {record.round} does not follow round {previous['round']}")
        self.rounds.append(record.after(previous).as_dict())
        if save:
            self.save()
        return self.rounds[-1]

    def save(self) -> None:
        document = {"arm": self.arm, "config": self.config, "versions": versions(), **self.extra, "rounds": self.rounds}
        atomic_write_text(self.path, strict_json(document))
