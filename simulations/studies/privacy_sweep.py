"""Final accuracy against epsilon, per arm, over runs of one DP config at several noise multipliers.

Each run directory is what ``fedcsg compare`` writes (its ``results.json``); the runs differ in
``dp-noise-multiplier`` (or ``dp = "none"``, drawn at the right of the plot as epsilon = infinity) and
may hold different arms and seeds. The table gives, per arm and noise multiplier, the epsilon after
the last round, the final accuracy (mean ± sample std over the seeds, and each seed's) and the mean of
the last 3 rounds; the plot (``--plot``) draws final accuracy against epsilon, one line per arm, the
seeds' spread as error bars.

Usage::

    python3 -m simulations.studies.privacy_sweep runs/dp runs/dp-sigma-0.5 runs/dp-sigma-0.3 runs/dp-none \\
        --plot docs/privacy/accuracy_vs_epsilon.png --json docs/privacy/sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from simulations.benchlib import print_table


def sweep_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per (run, arm): the run's noise multiplier and the arm's spreads from its results.json."""
    rows = []
    for run_dir in run_dirs:
        path = run_dir / "results.json"
        if not path.is_file():
            raise SystemExit(f"{run_dir}: no results.json (run `fedcsg compare` or `fedcsg report` there first)")
        results = json.loads(path.read_text())
        config = results["config"]
        sigma = None if config["dp"] == "none" else float(config["dp-noise-multiplier"])
        for arm, summary in results["summary"].items():
            epsilon = summary.get("epsilon", {}).get("mean")
            rows.append(
                {
                    "run": str(run_dir),
                    "arm": arm,
                    "dp": config["dp"],
                    "sigma": sigma,
                    "epsilon": math.inf if sigma is None else epsilon,
                    "final": summary["final_accuracy"],
                    "last": summary["last_accuracy"],
                    "total_wire_bytes": summary["total_wire_bytes"]["mean"],
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    no_dp = 1.5 * max(finite) if finite else 1.0  # where the runs without DP are drawn
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        points = sorted(
            ((no_dp if math.isinf(r["epsilon"]) else r["epsilon"], r["final"]) for r in rows if r["arm"] == arm),
            key=lambda point: point[0],
        )
        xs = [x for x, _ in points]
        ax.errorbar(
            xs, [f["mean"] for _, f in points], yerr=[f["std"] for _, f in points], marker="o", capsize=3, label=arm
        )
    if any(math.isinf(r["epsilon"]) for r in rows):
        ax.axvline(0.5 * (no_dp + max(finite, default=0.0)), color="grey", lw=0.5, ls=":")
        ax.annotate("no DP", (no_dp, ax.get_ylim()[0]), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("epsilon after the last round (RDP accountant, client level, delta as configured)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of `fedcsg compare`")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = sweep_rows(args.runs)
    table = []
    for r in sorted(rows, key=lambda r: (r["arm"], -(r["sigma"] if r["sigma"] is not None else -1))):
        final, last = r["final"], r["last"]
        each = ", ".join(f"{v:.4f}" for v in final["values"] if v is not None)
        table.append(
            [
                r["arm"],
                "none" if r["sigma"] is None else f"{r['sigma']:g}",
                "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}",
                f"{final['mean']:.4f} ± {final['std']:.4f}",
                each,
                f"{last['mean']:.4f}",
                final["n"],
            ]
        )
    print_table(["arm", "sigma", "epsilon", "final acc", "each seed", "last 3", "seeds"], table)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shown = [{**r, "epsilon": None if math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows]
        args.json.write_text(json.dumps({"rows": shown}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
