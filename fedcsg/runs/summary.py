"""The numbers of a report, from a run directory's arm records: per arm the final and best accuracy,
the mean accuracy of the last :data:`LAST_ROUNDS` rounds, bytes per round and in all (and a delta
downlink's resync bytes), and the bytes to reach the target accuracy and fedavg's final accuracy
minus one point; over seeds, the mean and spread of each."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcsg.data.registry import DATASETS
from fedcsg.runs.layout import ARMS_DIR, arm_record_files
from fedcsg.runs.records import read_arm_record
from fedcsg.spec.arms import Arm, arm_of_stem, arm_order


def metric_names(config: dict[str, Any]) -> tuple[str, str]:
    """``(short, long)`` name of what a run's ``test_accuracy`` holds: the mean IoU over the classes
    for a segmentation data set, the top-1 accuracy otherwise."""
    spec = DATASETS.get(config.get("dataset", ""))
    if spec is not None and spec.task == "segmentation":
        return "mIoU", "mean IoU"
    return "acc", "accuracy"


def load_results(out_dir: Path) -> dict[str, Any]:
    """Gather ``DIR/arms/*.json`` into one results document."""
    arm_files = arm_record_files(out_dir)
    if not arm_files:
        raise FileNotFoundError(
            f"no arm results in {str(Path(out_dir) / ARMS_DIR)!r}: run `fedcsg run` or `compare` first"
        )
    arms = {arm_of_stem(path.stem): read_arm_record(path) for path in arm_files}
    order = arm_order(list(arms))
    first = arms[order[0]]
    config = {k: v for k, v in first["config"].items() if k != "arm"}
    return {
        "config": config,
        "seed": config.get("seed"),
        "versions": first.get("versions", {}),
        "arms": {
            arm: {
                "config": arms[arm]["config"],
                "parameters": arms[arm].get("parameters"),
                "payload_bytes": arms[arm].get("payload_bytes"),
                "bundle_bytes": arms[arm].get("bundle_bytes"),
                "server_device": arms[arm].get("server_device"),
                "rounds": arms[arm]["rounds"],
                # a run with dp-max-epsilon that stopped early says where (fedcsg.fl.strategy)
                **(
                    {"stopped_by_privacy": arms[arm]["stopped_by_privacy"]} if "stopped_by_privacy" in arms[arm] else {}
                ),
            }
            for arm in order
        },
    }


MATCH_MARGIN = 0.01  # "reaches fedavg": within 1 point of fedavg's final accuracy
LAST_ROUNDS = 3  # "last_accuracy": the mean test accuracy of the last this many rounds (fewer in a shorter run)


def client_devices(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """How many aggregated replies of ``rounds`` trained on each device (``cpu``, ``cuda:N NAME``;
    "unknown" for a reply that did not say), most first."""
    counts = Counter(device or "unknown" for r in rounds for device in r.get("devices") or [])
    return dict(counts.most_common())


def _first_reaching(rounds: list[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    """The first round record (round > 0) whose test accuracy is at least ``accuracy``."""
    return next((r for r in rounds if r["test_accuracy"] >= accuracy), None)


def _wire_total(record: dict[str, Any] | None) -> int | None:
    return None if record is None else record["cum_wire_up"] + record["cum_wire_down"]


def node_download_bytes(bundle_bytes: int | None, rounds: list[dict[str, Any]]) -> int | None:
    """What one node sampled in every round downloads over the run: the app bundle (once) and its
    share of each round's downlink (every sampled node gets the same message). None without a bundle
    (a simulation)."""
    if bundle_bytes is None:
        return None
    return bundle_bytes + sum(round(r["wire_down"] / r["sampled"]) for r in rounds if r["sampled"])


def directions(arm: str, config: dict[str, Any]) -> tuple[str, str]:
    """(uplink, downlink) of an arm as it ran: its codec (``full`` without one) and its downlink (the
    one it names, else the run's ``downlink``); ``?`` for a name that is not an arm."""
    try:
        parsed = Arm.parse(arm)
    except ValueError:
        return "?", "?"
    return parsed.codec or "full", parsed.downlink_or(str(config.get("downlink", "full")))


@dataclass(frozen=True)
class ArmSummary:
    """The figures of one arm of a one-seed run (:func:`summarize`; a run over seeds has each as a
    spread over its seeds, :func:`summarize_seeds`). Bytes per round are the means over the trained
    rounds; ``None`` where a goal was never reached, or without a fedavg arm to compare with."""

    uplink: str
    downlink: str
    rounds: int
    final_accuracy: float
    best_accuracy: float
    last_accuracy: float
    payload_up_per_round: float
    payload_down_per_round: float
    wire_up_per_round: float
    wire_down_per_round: float
    total_wire_bytes: int
    total_payload_bytes: int
    target_accuracy: float
    wire_bytes_to_target: int | None
    round_to_target: int | None
    match_accuracy: float | None
    wire_bytes_to_match: int | None
    round_to_match: int | None
    seconds: float
    failed_rounds: int
    failed_replies: int
    rejected_replies: int
    resynced: int
    wire_down_resync: int
    bundle_bytes: int | None
    node_download_bytes: int | None
    client_devices: dict[str, int]
    server_device: str | None
    upload_ratio_vs_fedavg: float | None = None
    total_ratio_vs_fedavg: float | None = None

    def record(self, vs_fedavg: bool) -> dict[str, Any]:
        """Its entry in results.json: every figure, the ratios to fedavg only in a run with a fedavg arm."""
        record = dataclasses.asdict(self)
        if not vs_fedavg:
            del record["upload_ratio_vs_fedavg"], record["total_ratio_vs_fedavg"]
        return record


def summary_records(summaries: dict[str, ArmSummary]) -> dict[str, dict[str, Any]]:
    """The ``summary`` of a one-seed run's results.json."""
    return {arm: summary.record("fedavg" in summaries) for arm, summary in summaries.items()}


def summarize(results: dict[str, Any]) -> dict[str, ArmSummary]:
    """Per-arm figures of the report (see :func:`write_report`).

    Besides the arm's own figures: the wire bytes (up + down, cumulative) until the test accuracy
    first reaches ``target-accuracy``, and until it first reaches fedavg's final accuracy minus
    :data:`MATCH_MARGIN` (when the run has a fedavg arm); ``None`` where it never did. In a
    deployment, the app bundle each node downloaded and :func:`node_download_bytes`.
    """
    target = float(results["config"].get("target-accuracy", 0.5))
    fedavg_rounds = [r for r in results["arms"].get("fedavg", {}).get("rounds", []) if r["round"] > 0]
    match = fedavg_rounds[-1]["test_accuracy"] - MATCH_MARGIN if fedavg_rounds else None
    summary: dict[str, ArmSummary] = {}
    for arm, data in results["arms"].items():
        rounds = [r for r in data["rounds"] if r["round"] > 0]
        if not rounds:
            continue
        accuracies = [r["test_accuracy"] for r in data["rounds"]]
        last = rounds[-1]
        reached = _first_reaching(rounds, target)
        matched = _first_reaching(rounds, match) if match is not None else None
        up, down = directions(arm, data.get("config", {}))
        summary[arm] = ArmSummary(
            uplink=up,
            downlink=down,
            rounds=len(rounds),
            final_accuracy=last["test_accuracy"],
            best_accuracy=max(accuracies),
            last_accuracy=sum(r["test_accuracy"] for r in rounds[-LAST_ROUNDS:]) / len(rounds[-LAST_ROUNDS:]),
            # The mean over the trained rounds: a delta downlink's first round resyncs every node in full.
            payload_up_per_round=last["cum_payload_up"] / len(rounds),
            payload_down_per_round=last["cum_payload_down"] / len(rounds),
            wire_up_per_round=last["cum_wire_up"] / len(rounds),
            wire_down_per_round=last["cum_wire_down"] / len(rounds),
            total_wire_bytes=last["cum_wire_up"] + last["cum_wire_down"],
            total_payload_bytes=last["cum_payload_up"] + last["cum_payload_down"],
            target_accuracy=target,
            wire_bytes_to_target=_wire_total(reached),
            round_to_target=reached["round"] if reached else None,
            match_accuracy=match,
            wire_bytes_to_match=_wire_total(matched),
            round_to_match=matched["round"] if matched else None,
            seconds=sum(r["seconds"] or 0.0 for r in rounds),
            failed_rounds=sum(r.get("status") == "failed" for r in rounds),
            failed_replies=sum(r.get("failed") or 0 for r in rounds),
            rejected_replies=sum(r.get("rejected") or 0 for r in rounds),
            resynced=sum(r.get("resynced") or 0 for r in rounds),
            wire_down_resync=sum(r.get("wire_down_resync") or 0 for r in rounds),
            bundle_bytes=data.get("bundle_bytes"),
            node_download_bytes=node_download_bytes(data.get("bundle_bytes"), rounds),
            client_devices=client_devices(rounds),
            server_device=data.get("server_device"),
        )
    if "fedavg" in summary:
        base = summary["fedavg"]
        for arm, figures in summary.items():
            summary[arm] = dataclasses.replace(
                figures,
                upload_ratio_vs_fedavg=ratio(base.wire_up_per_round, figures.wire_up_per_round),
                total_ratio_vs_fedavg=ratio(base.total_wire_bytes, figures.total_wire_bytes),
            )
    return summary


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    mean = sum(present) / len(present) if present else None
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
        if len(present) > 1
        else (0.0 if present else None)
    )
    return {"mean": mean, "std": std, "n": len(present), "values": list(values)}


SPREAD_FIGURES = (
    "final_accuracy",
    "best_accuracy",
    "last_accuracy",
    "wire_bytes_to_target",
    "round_to_target",
    "match_accuracy",
    "wire_bytes_to_match",
    "round_to_match",
    "total_wire_bytes",
    "wire_up_per_round",
    "wire_down_per_round",
    "resynced",
    "wire_down_resync",
    "seconds",
)


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm, each figure of :func:`summarize` over the seeds: ``{"mean", "std", "n", "values"}``
    (``n`` counts the seeds where it exists: bytes to target only where the target was reached)."""
    arms = arm_order(sorted({a for s in per_seed.values() for a in s["summary"]}))
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rows = [per_seed[seed]["summary"].get(arm, {}) for seed in per_seed]
        out[arm] = {"seeds": [seed for seed in per_seed if arm in per_seed[seed]["summary"]]}
        for figure in SPREAD_FIGURES:
            out[arm][figure] = spread([row.get(figure) for row in rows])
        out[arm]["target_accuracy"] = next((r["target_accuracy"] for r in rows if r), None)
    if "fedavg" in out:
        base = out["fedavg"]
        for figures in out.values():
            figures["upload_ratio_vs_fedavg"] = ratio(
                base["wire_up_per_round"]["mean"], figures["wire_up_per_round"]["mean"]
            )
            figures["total_ratio_vs_fedavg"] = ratio(
                base["total_wire_bytes"]["mean"], figures["total_wire_bytes"]["mean"]
            )
    return out


def ratio(base: float | None, value: float | None) -> float | None:
    """``base / value``, or None where either is missing or ``value`` is 0 (an arm that sent nothing)."""
    return base / value if base is not None and value else None


def rounds_by_number(per_seed: dict[int, dict[str, Any]], arm: str) -> dict[int, list[dict[str, Any]]]:
    """The round records of ``arm`` in every seed, by round number."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    for results in per_seed.values():
        for record in results["arms"].get(arm, {}).get("rounds", []):
            rounds.setdefault(record["round"], []).append(record)
    return dict(sorted(rounds.items()))
