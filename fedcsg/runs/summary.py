"""The numbers of a report, from a run directory's arm records: per arm the final and best accuracy,
the mean accuracy of the last :data:`LAST_ROUNDS` rounds, bytes per round and in all (and a delta
downlink's resync bytes), and the bytes to reach the target accuracy and fedavg's final accuracy
minus one point, each a :class:`Spread` over the run's seeds (one seed for a one-seed run) in one
:class:`ArmSummary` per arm."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping
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
class Spread:
    """A figure over a run's seeds: its value in each seed, in the seeds' order (None where the arm did
    not run, or never reached the goal, in that seed), and the mean and sample standard deviation (n - 1;
    0 for one value) of the values that are not None. A one-seed run's figure is a spread of one value."""

    values: tuple[Any, ...]

    @classmethod
    def of(cls, values: Iterable[Any]) -> Spread:
        return cls(tuple(values))

    @property
    def present(self) -> list[float]:
        return [float(v) for v in self.values if v is not None]

    @property
    def n(self) -> int:
        """How many seeds have a value."""
        return len(self.present)

    @property
    def mean(self) -> float | None:
        present = self.present
        return sum(present) / len(present) if present else None

    @property
    def std(self) -> float | None:
        present, mean = self.present, self.mean
        if mean is None:
            return None
        return math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else 0.0

    def record(self) -> dict[str, Any]:
        """Its entry in results.json: ``{"mean", "std", "n", "values"}``."""
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


@dataclass(frozen=True)
class ArmSummary:
    """The figures of one arm over a run's seeds (:func:`summarize`; a one-seed run is a run over one
    seed). Every figure that a seed measures is a :class:`Spread` over the seeds: bytes per round are the
    means over a seed's trained rounds, ``last_accuracy`` the mean accuracy of its last :data:`LAST_ROUNDS`
    rounds, a goal's bytes and round None where that seed never reached it, ``match_accuracy`` fedavg's
    final accuracy minus :data:`MATCH_MARGIN` in that seed (None without a fedavg arm), ``epsilon`` the
    accountant's after the seed's last round (None without DP). The ratios to fedavg, the baseline, are of
    the means (None without a fedavg arm, or where the arm sent nothing)."""

    arm: str
    uplink: str
    downlink: str
    seeds: tuple[int, ...]  # the seeds in which the arm trained a round
    target_accuracy: float
    rounds: Spread
    final_accuracy: Spread
    best_accuracy: Spread
    last_accuracy: Spread
    payload_up_per_round: Spread
    payload_down_per_round: Spread
    wire_up_per_round: Spread
    wire_down_per_round: Spread
    total_wire_bytes: Spread
    total_payload_bytes: Spread
    wire_bytes_to_target: Spread
    round_to_target: Spread
    match_accuracy: Spread
    wire_bytes_to_match: Spread
    round_to_match: Spread
    seconds: Spread
    failed_rounds: Spread
    failed_replies: Spread
    rejected_replies: Spread
    resynced: Spread
    wire_down_resync: Spread
    bundle_bytes: Spread
    node_download_bytes: Spread
    epsilon: Spread
    client_devices: dict[str, int]  # aggregated replies per device, over the seeds
    server_devices: tuple[str, ...]  # the server's devices, in the seeds' order, each once
    upload_ratio_vs_fedavg: float | None = None
    total_ratio_vs_fedavg: float | None = None

    def record(self, vs_fedavg: bool) -> dict[str, Any]:
        """Its entry in results.json (under its arm): every figure, a spread as ``{"mean", "std", "n",
        "values"}``; the ratios to fedavg only in a run with a fedavg arm, epsilon only under DP."""
        record: dict[str, Any] = {}
        for figure in dataclasses.fields(self):
            value = getattr(self, figure.name)
            record[figure.name] = value.record() if isinstance(value, Spread) else value
        record["seeds"], record["server_devices"] = list(self.seeds), list(self.server_devices)
        del record["arm"]
        if not vs_fedavg:
            del record["upload_ratio_vs_fedavg"], record["total_ratio_vs_fedavg"]
        if not self.epsilon.n:
            del record["epsilon"]
        return record


# The figures each seed measures: an ArmSummary's spreads.
SEED_FIGURES = tuple(f.name for f in dataclasses.fields(ArmSummary) if f.type == "Spread")


def summary_records(summaries: dict[str, ArmSummary]) -> dict[str, dict[str, Any]]:
    """The ``summary`` of a results.json, one seed or several."""
    return {arm: summary.record("fedavg" in summaries) for arm, summary in summaries.items()}


def _seed_figures(data: dict[str, Any], target: float, match: float | None) -> dict[str, Any] | None:
    """The figures one seed measures of one arm (``data``: its results' entry), each an
    :class:`ArmSummary` figure; None where the arm trained no round."""
    rounds = [r for r in data["rounds"] if r["round"] > 0]
    if not rounds:
        return None
    last = rounds[-1]
    reached = _first_reaching(rounds, target)
    matched = _first_reaching(rounds, match) if match is not None else None
    epsilons = [r["epsilon"] for r in rounds if r.get("epsilon") is not None]
    return {
        "rounds": len(rounds),
        "final_accuracy": last["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in data["rounds"]),
        "last_accuracy": sum(r["test_accuracy"] for r in rounds[-LAST_ROUNDS:]) / len(rounds[-LAST_ROUNDS:]),
        # The mean over the trained rounds: a delta downlink's first round resyncs every node in full.
        "payload_up_per_round": last["cum_payload_up"] / len(rounds),
        "payload_down_per_round": last["cum_payload_down"] / len(rounds),
        "wire_up_per_round": last["cum_wire_up"] / len(rounds),
        "wire_down_per_round": last["cum_wire_down"] / len(rounds),
        "total_wire_bytes": last["cum_wire_up"] + last["cum_wire_down"],
        "total_payload_bytes": last["cum_payload_up"] + last["cum_payload_down"],
        "wire_bytes_to_target": _wire_total(reached),
        "round_to_target": reached["round"] if reached else None,
        "match_accuracy": match,
        "wire_bytes_to_match": _wire_total(matched),
        "round_to_match": matched["round"] if matched else None,
        "seconds": sum(r["seconds"] or 0.0 for r in rounds),
        "failed_rounds": sum(r.get("status") == "failed" for r in rounds),
        "failed_replies": sum(r.get("failed") or 0 for r in rounds),
        "rejected_replies": sum(r.get("rejected") or 0 for r in rounds),
        "resynced": sum(r.get("resynced") or 0 for r in rounds),
        "wire_down_resync": sum(r.get("wire_down_resync") or 0 for r in rounds),
        "bundle_bytes": data.get("bundle_bytes"),
        "node_download_bytes": node_download_bytes(data.get("bundle_bytes"), rounds),
        "epsilon": epsilons[-1] if epsilons else None,
    }


def _figures_of_seed(results: dict[str, Any], target: float) -> dict[str, dict[str, Any] | None]:
    """:func:`_seed_figures` of every arm of one seed's ``results``, matched against the seed's fedavg:
    its final accuracy minus :data:`MATCH_MARGIN` (no match without a fedavg arm)."""
    fedavg_rounds = [r for r in results["arms"].get("fedavg", {}).get("rounds", []) if r["round"] > 0]
    match = fedavg_rounds[-1]["test_accuracy"] - MATCH_MARGIN if fedavg_rounds else None
    return {arm: _seed_figures(data, target, match) for arm, data in results["arms"].items()}


def summarize(config: Mapping[str, Any], per_seed: Mapping[int, dict[str, Any]]) -> dict[str, ArmSummary]:
    """Per-arm figures of the report (see :func:`~fedcsg.runs.report.write_report`) over the seeds of
    ``per_seed`` (each seed's results, :func:`load_results`; one seed for a one-seed run), in the report's
    order, of every arm that trained a round in some seed.

    Besides each arm's own figures: the wire bytes (up + down, cumulative) until the test accuracy
    first reaches ``target-accuracy`` (of ``config``), and until it first reaches fedavg's final
    accuracy minus :data:`MATCH_MARGIN` (when the seed has a fedavg arm). In a deployment, the app
    bundle each node downloaded and :func:`node_download_bytes`.
    """
    target = float(config.get("target-accuracy", 0.5))
    figures = {seed: _figures_of_seed(results, target) for seed, results in per_seed.items()}
    trained = {arm for seed_figures in figures.values() for arm, f in seed_figures.items() if f is not None}
    summary = {arm: _arm_summary(arm, per_seed, figures, target) for arm in arm_order(sorted(trained))}
    if "fedavg" in summary:
        base = summary["fedavg"]
        for arm, s in summary.items():
            summary[arm] = dataclasses.replace(
                s,
                upload_ratio_vs_fedavg=ratio(base.wire_up_per_round.mean, s.wire_up_per_round.mean),
                total_ratio_vs_fedavg=ratio(base.total_wire_bytes.mean, s.total_wire_bytes.mean),
            )
    return summary


def _arm_summary(
    arm: str,
    per_seed: Mapping[int, dict[str, Any]],
    figures: dict[int, dict[str, dict[str, Any] | None]],
    target: float,
) -> ArmSummary:
    """``arm``'s :class:`ArmSummary` from each seed's figures (:func:`_seed_figures`)."""
    seeds = [seed for seed, by_arm in figures.items() if by_arm.get(arm) is not None]
    rows = [figures[seed].get(arm) or {} for seed in figures]
    ran = [per_seed[seed]["arms"][arm] for seed in seeds]
    up, down = directions(arm, ran[0].get("config", {}))
    devices: Counter[str] = Counter()
    for data in ran:
        devices.update(client_devices([r for r in data["rounds"] if r["round"] > 0]))
    return ArmSummary(
        arm=arm,
        uplink=up,
        downlink=down,
        seeds=tuple(seeds),
        target_accuracy=target,
        client_devices=dict(devices.most_common()),
        server_devices=tuple(dict.fromkeys(d["server_device"] for d in ran if d.get("server_device"))),
        **{figure: Spread.of(row.get(figure) for row in rows) for figure in SEED_FIGURES},
    )


def seed_results(document: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Each seed's results in a results.json ``document``, by seed: a run over seeds' ``per_seed``, a
    one-seed run's document itself."""
    if "per_seed" in document:
        return {int(seed): results for seed, results in document["per_seed"].items()}
    return {document.get("seed"): dict(document)}


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
