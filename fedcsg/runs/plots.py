"""The report's plots: test accuracy against cumulative wire bytes and against the round, one
line per arm (over seeds: the mean, in a band from the lowest to the highest seed), styled by codec and downlink;
and for a run with differential privacy, against the epsilon spent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedcsg.runs.summary import rounds_by_number
from fedcsg.spec.arms import MODELS, Arm
from fedcsg.spec.codecs import CODECS, NO_CODEC_LINESTYLE

DOWNLINK_MARKERS = {"": "o", "full": "o", "fp16": "s", "int8": "^", "delta-int8": "v", "delta-topk": "D"}


def _style(arm: str) -> dict[str, Any]:
    """One colour per model, one line style per codec and one marker per downlink, so ``csg``,
    ``csg+int8`` and ``csg+int8/int8`` read as kin."""
    try:
        parsed = Arm.parse(arm)
    except ValueError:  # an older run's arm name
        return {"marker": "o"}
    return {
        "color": f"C{MODELS.index(parsed.model)}",
        "linestyle": CODECS[parsed.codec].linestyle if parsed.codec else NO_CODEC_LINESTYLE,
        "marker": DOWNLINK_MARKERS[parsed.downlink],
    }


def _save(fig: Any, out_dir: Path, name: str) -> None:
    import matplotlib.pyplot as plt

    tmp = out_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_dir / name)


def plot_accuracy_vs_epsilon(
    per_seed: dict[int, dict[str, Any]], arms: list[str], title: str, out_dir: Path, metric: str = "accuracy"
) -> None:
    """accuracy_vs_epsilon.png: per arm the test ``metric`` after each round against the privacy accountant's
    epsilon spent by then (``epsilon`` of the round records; the mean over the seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in arms:
        rounds = [recs for recs in rounds_by_number(per_seed, arm).values() if recs[0].get("epsilon") is not None]
        xs = [sum(x["epsilon"] for x in recs) / len(recs) for recs in rounds]
        ys = [sum(x["test_accuracy"] for x in recs) / len(recs) for recs in rounds]
        ax.plot(xs, ys, markersize=3, label=arm, **_style(arm))
    ax.set_xlabel("epsilon spent (RDP accountant, client level)")
    ax.set_ylabel(f"test {metric}" + (" (mean over seeds)" if len(per_seed) > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, out_dir, "accuracy_vs_epsilon.png")


def plot_accuracy(
    per_seed: dict[int, dict[str, Any]], arms: list[str], title: str, out_dir: Path, metric: str = "accuracy"
) -> None:
    """accuracy_vs_bytes.png and accuracy_vs_round.png: per arm the test ``metric`` per round (the
    mean over the seeds, with a band from the lowest to the highest seed when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    several = len(per_seed) > 1
    for name, by_bytes, x_label in (
        ("accuracy_vs_bytes.png", True, "cumulative wire bytes, up + down (MB)"),
        ("accuracy_vs_round.png", False, "round"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm in arms:
            # log scale for bytes: round 0 (no bytes yet) has no place on it
            rounds = {r: recs for r, recs in rounds_by_number(per_seed, arm).items() if not by_bytes or r > 0}
            xs = [
                sum(x["cum_wire_up"] + x["cum_wire_down"] for x in recs) / len(recs) / 1e6 if by_bytes else r
                for r, recs in rounds.items()
            ]
            accs = [[x["test_accuracy"] for x in recs] for recs in rounds.values()]
            (line,) = ax.plot(xs, [sum(a) / len(a) for a in accs], markersize=3, label=arm, **_style(arm))
            if several:
                ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.2)
        if by_bytes:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_label + (" (mean over seeds)" if several and by_bytes else ""))
        ax.set_ylabel(f"test {metric}" + (" (mean; band: min to max over seeds)" if several else ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _save(fig, out_dir, name)
