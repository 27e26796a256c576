"""Results of federated runs: per-arm round records on disk, and the report built from them.

Layout of an output directory::

    DIR/arms/<arm>.json      written by the ServerApp after every round (atomic rename)
    DIR/state/<arm>.json     the arm's checkpoint after its last complete round (see fedcsg.checkpoint)
    DIR/state/<arm>-round-NNNN.safetensors   the global payload of that round
    DIR/results.json         config, versions, seed, and every arm's round records
    DIR/results.csv          one row per arm and round
    DIR/report.md            per-arm summary: accuracy, bytes per round, totals, ratio to fedavg
    DIR/accuracy_vs_bytes.png, DIR/accuracy_vs_round.png
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

ROUND_FIELDS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "train_accuracy",
    "lr",
    "sampled",
    "replied",
    "failed",
    "rejected",
    "partitions",
    "failed_partitions",
    "status",
    "attempts",
    "payload_up",
    "payload_down",
    "wire_up",
    "wire_down",
    "cum_payload_up",
    "cum_payload_down",
    "cum_wire_up",
    "cum_wire_down",
    "seconds",
)
ARM_ORDER = ("fedavg", "csg", "csg-frozen")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers, and a restart after a crash, see the old or the
    new file, never a torn one: temporary file in the same directory, fsync, rename, fsync of the
    directory (so that the rename itself survives a power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def versions() -> dict[str, str]:
    import flwr
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__}


class ArmRecorder:
    """Collects one arm's round records and rewrites ``DIR/arms/<arm>.json`` after each round."""

    def __init__(self, out_dir: Path, arm: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        self.path = Path(out_dir) / "arms" / f"{arm}.json"
        self.arm = arm
        self.config = config
        self.extra = extra or {}
        self.rounds: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any], *, save: bool = True) -> dict[str, Any]:
        """Append a round record (cumulative byte counts are added here) and, if ``save``, rewrite the file."""
        previous = self.rounds[-1] if self.rounds else {}
        if previous and record["round"] != previous["round"] + 1:
            raise ValueError(f"round {record['round']} does not follow round {previous['round']}")
        for key in ("payload_up", "payload_down", "wire_up", "wire_down"):
            record[f"cum_{key}"] = previous.get(f"cum_{key}", 0) + record[key]
        self.rounds.append({k: record.get(k) for k in ROUND_FIELDS})
        if save:
            self.save()
        return self.rounds[-1]

    def save(self) -> None:
        document = {"arm": self.arm, "config": self.config, "versions": versions(), **self.extra, "rounds": self.rounds}
        atomic_write_text(self.path, json.dumps(document, indent=1))


def load_results(out_dir: Path) -> dict[str, Any]:
    """Gather ``DIR/arms/*.json`` into one results document."""
    arm_files = sorted((Path(out_dir) / "arms").glob("*.json"))
    if not arm_files:
        raise FileNotFoundError(
            f"no arm results in {str(Path(out_dir) / 'arms')!r}: run `fedcsg run` or `compare` first"
        )
    arms = {}
    for path in arm_files:
        try:
            arms[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    order = [a for a in ARM_ORDER if a in arms] + sorted(a for a in arms if a not in ARM_ORDER)
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
                "rounds": arms[arm]["rounds"],
            }
            for arm in order
        },
    }


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-arm figures of the report (see :func:`write_report`)."""
    target = float(results["config"].get("target-accuracy", 0.5))
    summary: dict[str, dict[str, Any]] = {}
    for arm, data in results["arms"].items():
        rounds = [r for r in data["rounds"] if r["round"] > 0]
        if not rounds:
            continue
        accuracies = [r["test_accuracy"] for r in data["rounds"]]
        last = rounds[-1]
        reached = next((r for r in rounds if r["test_accuracy"] >= target), None)
        summary[arm] = {
            "rounds": len(rounds),
            "final_accuracy": last["test_accuracy"],
            "best_accuracy": max(accuracies),
            "payload_up_per_round": rounds[0]["payload_up"],
            "payload_down_per_round": rounds[0]["payload_down"],
            "wire_up_per_round": rounds[0]["wire_up"],
            "wire_down_per_round": rounds[0]["wire_down"],
            "total_wire_bytes": last["cum_wire_up"] + last["cum_wire_down"],
            "total_payload_bytes": last["cum_payload_up"] + last["cum_payload_down"],
            "target_accuracy": target,
            "wire_bytes_to_target": (reached["cum_wire_up"] + reached["cum_wire_down"]) if reached else None,
            "round_to_target": reached["round"] if reached else None,
            "seconds": sum(r["seconds"] or 0.0 for r in rounds),
            "failed_rounds": sum(r.get("status") == "failed" for r in rounds),
            "failed_replies": sum(r.get("failed") or 0 for r in rounds),
            "rejected_replies": sum(r.get("rejected") or 0 for r in rounds),
        }
    if "fedavg" in summary:
        base = summary["fedavg"]
        for figures in summary.values():
            figures["upload_ratio_vs_fedavg"] = base["wire_up_per_round"] / figures["wire_up_per_round"]
            figures["total_ratio_vs_fedavg"] = base["total_wire_bytes"] / figures["total_wire_bytes"]
    return summary


def _mb(value: float | None) -> str:
    return "not reached" if value is None else f"{value / 1e6:.3f} MB"


def _report_markdown(results: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    cfg = results["config"]
    lines = [
        f"# fedcsg report: {cfg.get('model')} on {cfg.get('dataset')}",
        "",
        f"{cfg.get('num-clients')} clients, partitioner {cfg.get('partitioner')}"
        + (f" (alpha {cfg.get('dirichlet-alpha')})" if cfg.get("partitioner") == "dirichlet" else "")
        + f", {cfg.get('num-rounds')} rounds, {cfg.get('local-epochs')} local epoch(s), seed {results.get('seed')}, "
        f"slice {cfg.get('slice')} / code dim {cfg.get('code-dim')}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
        "",
        "Bytes are per round, summed over the sampled clients. *Payload* is raw tensor bytes; *wire* is the "
        "serialized Flower messages (payload, array headers, keys, config and metadata).",
        "",
        "| arm | final acc | best acc | payload up / round | payload down / round | wire up / round | "
        "wire down / round | total wire | upload ratio vs fedavg | total ratio vs fedavg | "
        f"wire bytes to {summary[next(iter(summary))]['target_accuracy']:.0%} acc | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, s in summary.items():
        up_ratio = f"{s['upload_ratio_vs_fedavg']:.2f}x" if "upload_ratio_vs_fedavg" in s else "-"
        total_ratio = f"{s['total_ratio_vs_fedavg']:.2f}x" if "total_ratio_vs_fedavg" in s else "-"
        reach = _mb(s["wire_bytes_to_target"])
        if s["round_to_target"] is not None:
            reach += f" (round {s['round_to_target']})"
        lines.append(
            f"| {arm} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {_mb(s['payload_up_per_round'])} | "
            f"{_mb(s['payload_down_per_round'])} | {_mb(s['wire_up_per_round'])} | {_mb(s['wire_down_per_round'])} | "
            f"{_mb(s['total_wire_bytes'])} | {up_ratio} | {total_ratio} | {reach} | {s['seconds']:.1f} |"
        )
    faults = [
        f"{arm}: {s['failed_rounds']} failed round(s), {s['failed_replies']} failed and "
        f"{s['rejected_replies']} rejected client replies"
        for arm, s in summary.items()
        if s["failed_rounds"] or s["failed_replies"] or s["rejected_replies"]
    ]
    if faults:
        lines += ["", "Client faults (`failed`, `rejected`, `status` in results.csv): " + "; ".join(faults) + "."]
    lines += ["", "## Test accuracy per round", ""]
    arms = list(results["arms"])
    lines.append("| round | " + " | ".join(arms) + " |")
    lines.append("| ---: | " + " | ".join("---:" for _ in arms) + " |")
    by_round: dict[int, dict[str, float]] = {}
    for arm, data in results["arms"].items():
        for r in data["rounds"]:
            by_round.setdefault(r["round"], {})[arm] = r["test_accuracy"]
    for rnd in sorted(by_round):
        cells = [f"{by_round[rnd][a]:.4f}" if a in by_round[rnd] else "" for a in arms]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy vs bytes](accuracy_vs_bytes.png)", "", "![accuracy vs round](accuracy_vs_round.png)", ""]
    return "\n".join(lines)


def _plots(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, x_key, x_label in (
        ("accuracy_vs_bytes.png", "cum_wire", "cumulative wire bytes, up + down (MB)"),
        ("accuracy_vs_round.png", "round", "round"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm, data in results["arms"].items():
            if x_key == "round":
                rounds = data["rounds"]
                xs = [r["round"] for r in rounds]
            else:  # log scale: round 0 (no bytes yet) has no place on it
                rounds = [r for r in data["rounds"] if r["round"] > 0]
                xs = [(r["cum_wire_up"] + r["cum_wire_down"]) / 1e6 for r in rounds]
                ax.set_xscale("log")
            ax.plot(xs, [r["test_accuracy"] for r in rounds], marker="o", markersize=3, label=arm)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{results['config'].get('model')} on {results['config'].get('dataset')}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, out_dir / name)


def _csv_cell(value: Any) -> Any:
    return " ".join(map(str, value)) if isinstance(value, list) else value


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """(Re)build results.json, results.csv, report.md and the plots from ``DIR/arms/*.json``."""
    out_dir = Path(out_dir)
    results = load_results(out_dir)
    summary = summarize(results)
    results["summary"] = summary
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    rows = [
        {"arm": arm, **{k: _csv_cell(r.get(k)) for k in ROUND_FIELDS}}
        for arm, data in results["arms"].items()
        for r in data["rounds"]
    ]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["arm", *ROUND_FIELDS])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", table.getvalue())
    if summary:
        atomic_write_text(out_dir / "report.md", _report_markdown(results, summary))
        _plots(results, out_dir)
    return results
