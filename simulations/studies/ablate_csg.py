"""Ablation of what makes CSG train as well as the plain model: init x server optimizer x
aggregation x lr x local epochs, one factor at a time from a baseline, on the same partitions.

Every run is a real ``fedcsg run`` (a fresh process, Flower's simulation engine on Ray) of one arm
on ResNet-20 / CIFAR-10 split over ``--clients`` Dirichlet(0.5) clients, or ``--partitioner shards``
clients of ``--shards-per-client`` label shards each (``--train-limit`` images, ``--rounds`` rounds,
all clients every round; every setting the grid does not name from ``--config``, by default the
20-round Dirichlet experiment's slice, code size, batch and lr schedule). Partitions depend only on
the data settings and the seed, so every arm and cell of a seed trains on the same partitions.

The baseline cell is ``csg-init = kaiming``, ``server-optimizer = fedavg``, ``csg-aggregation =
factors``, ``lr = 0.05``, 1 local epoch; every other cell changes one setting, and runs only the
arms the change can affect (the init does not touch fedavg; ``alternate`` is a no-op for fedavg
and csg-frozen). Combinations of two changed factors are left out (listed at the start).

The table gives, per cell and arm, mean and spread (sample std, n - 1: fedcsg.runs.summary.Spread) of the
final test accuracy over the seeds, and of the rounds to reach ``--target`` (runs that never reach it
are counted apart). Results go to ``--out`` (JSON) after every run; a rerun skips the runs already there, so
the script can be cut off and started again.

Budget: one ResNet-20 run over 5,000 images and 10 rounds takes about 5 minutes on this 2-core
machine; the default cells (baseline, paper init, alternate, fedavgm, fedadam) x 2 seeds are 16
runs, about 80-90 minutes. ``--cells all`` adds fedyogi, lr 0.02 / 0.1 and 2 local epochs.

Usage::

    python3 -m simulations.studies.ablate_csg                                  # default cells, 2 seeds
    python3 -m simulations.studies.ablate_csg --cells all --seeds 3 --out runs/ablate-all.json
    python3 -m simulations.studies.ablate_csg --quick                          # tiny smoke grid (minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcsg.runs.summary import Spread
from simulations.benchlib import add_config_argument, print_table, run_fedcsg, write_json

BASELINE: dict[str, Any] = {
    "csg-init": "kaiming",
    "server-optimizer": "fedavg",
    "csg-aggregation": "factors",
    "lr": 0.05,
    "local-epochs": 1,
}
ALL_ARMS = ("fedavg", "csg", "csg-frozen")


@dataclass(frozen=True)
class Cell:
    """One setting of the grid: the baseline with ``changes``, run for ``arms``."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    arms: tuple[str, ...] = ALL_ARMS

    def settings(self) -> dict[str, Any]:
        return {**BASELINE, **self.changes}


CELLS: tuple[Cell, ...] = (
    Cell("baseline"),
    Cell("init=paper", {"csg-init": "paper"}, ("csg", "csg-frozen")),
    Cell("init=balanced", {"csg-init": "balanced"}, ("csg",)),
    Cell("codes-lr=0.1", {"codes-lr-scale": 0.1}, ("csg", "csg-frozen")),
    Cell("codes-lr=0.3", {"codes-lr-scale": 0.3}, ("csg", "csg-frozen")),
    Cell("aggregation=alternate", {"csg-aggregation": "alternate"}, ("csg",)),
    Cell("server=fedavgm", {"server-optimizer": "fedavgm"}, ("fedavg", "csg")),
    Cell("server=fedadam", {"server-optimizer": "fedadam", "server-lr": 0.01}, ("fedavg", "csg")),
    Cell("server=fedyogi", {"server-optimizer": "fedyogi", "server-lr": 0.01}, ("fedavg", "csg")),
    Cell("lr=0.02", {"lr": 0.02}),
    Cell("lr=0.1", {"lr": 0.1}),
    Cell("local-epochs=2", {"local-epochs": 2}),
)
DEFAULT_CELLS = ("baseline", "init=paper", "aggregation=alternate", "server=fedavgm", "server=fedadam")
QUICK_CELLS = ("baseline", "aggregation=alternate", "server=fedadam")


def run_key(cell: str, arm: str, seed: int) -> str:
    return f"{cell}|{arm}|{seed}"


def rounds_to_target(accuracy: Sequence[float], target: float) -> int | None:
    """First round (>= 1) whose test accuracy (``accuracy[r]`` for round r) reaches ``target``; None if none does."""
    return next((r for r, a in enumerate(accuracy) if r >= 1 and a >= target), None)


def run_record(cell: Cell, arm: str, seed: int, rounds: list[dict[str, Any]], seconds: float) -> dict:
    """What the JSON keeps of one run."""
    return {
        "cell": cell.name,
        "arm": arm,
        "seed": seed,
        "settings": cell.settings(),
        "final_accuracy": float(rounds[-1]["test_accuracy"]),
        "round0_loss": rounds[0]["test_loss"],  # None where it was not finite (strict JSON)
        "accuracy": [float(r["test_accuracy"]) for r in rounds],
        "bytes": int(rounds[-1].get("cum_wire_up", 0)) + int(rounds[-1].get("cum_wire_down", 0)),
        "seconds": seconds,
    }


TAIL_ROUNDS = 3


def tail_mean(accuracy: Sequence[float], rounds: int = TAIL_ROUNDS) -> float:
    """Mean test accuracy of the last ``rounds`` rounds (round 0 excluded): steadier than the final
    round's, which swings by several points from round to round at the ablation's size."""
    trained = list(accuracy[1:]) or list(accuracy)
    return statistics.fmean(trained[-rounds:])


def summarize(records: Sequence[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """One row per (cell, arm), in first-seen order: seeds, mean / spread of final accuracy and of
    the last rounds' mean (:func:`tail_mean`), and of the rounds to ``target`` over the runs that
    reached it (``reached`` counts them), read from each run's accuracy curve."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["cell"], record["arm"]), []).append(record)
    rows = []
    for (cell, arm), runs in groups.items():
        finals = Spread.of(r["final_accuracy"] for r in runs)
        tails = Spread.of(tail_mean(r["accuracy"]) for r in runs)
        reached = Spread.of(n for n in (rounds_to_target(r["accuracy"], target) for r in runs) if n is not None)
        rows.append(
            {
                "cell": cell,
                "arm": arm,
                "seeds": len(runs),
                "final_mean": finals.mean,
                "final_spread": finals.std,
                "tail_mean": tails.mean,
                "tail_spread": tails.std,
                "reached": reached.n,
                "rounds_mean": reached.mean,
                "rounds_spread": reached.std,
            }
        )
    return rows


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[object]]:
    def rounds(row: dict[str, Any]) -> str:
        if row["rounds_mean"] is None:
            return f"- (0/{row['seeds']})"
        return f"{row['rounds_mean']:.1f} +- {row['rounds_spread']:.1f} ({row['reached']}/{row['seeds']})"

    return [
        [
            r["cell"],
            r["arm"],
            r["seeds"],
            f"{r['final_mean']:.4f} +- {r['final_spread']:.4f}",
            f"{r['tail_mean']:.4f} +- {r['tail_spread']:.4f}",
            rounds(r),
        ]
        for r in rows
    ]


def partition_sets(args: argparse.Namespace) -> dict[str, Any]:
    """The partitioner's settings: Dirichlet(0.5) or ``--shards-per-client`` label shards a client."""
    if args.partitioner == "shards":
        return {"partitioner": "shards", "shards-per-client": args.shards_per_client}
    return {"partitioner": "dirichlet", "dirichlet-alpha": 0.5}


def base_sets(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "model": args.model,
        "dataset": "cifar10",
        "num-clients": args.clients,
        **partition_sets(args),
        "train-limit": args.train_limit,
        "test-limit": args.test_limit,
        "num-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-train-nodes": args.clients,
        "min-available-nodes": args.clients,
        "target-accuracy": args.target,
        "device": "cpu",
        "seed": seed,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="comma-separated cell names, or 'all'")
    parser.add_argument("--arms", default=",".join(ALL_ARMS), help="only these arms (of each cell's)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per cell (0, 1, ...)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run")
    parser.add_argument("--clients", type=int, default=10, help="clients, all trained every round")
    parser.add_argument(
        "--partitioner", choices=("dirichlet", "shards"), default="dirichlet", help="Dirichlet(0.5) or label shards"
    )
    parser.add_argument("--shards-per-client", type=int, default=2, help="label shards a client (with shards)")
    parser.add_argument("--train-limit", type=int, default=5000, help="train images shared by the clients")
    parser.add_argument("--test-limit", type=int, default=1000, help="test images of the server-side evaluation")
    parser.add_argument("--model", default="resnet20", help="registry model")
    add_config_argument(parser)
    parser.add_argument(
        "--target",
        type=float,
        default=0.3,
        help="accuracy of the rounds-to-target column (read from the stored curves)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="tiny smoke grid: 1 seed, 2 rounds, 4 clients, 400 images")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate_csg.json"), help="JSON results (resumed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.clients, args.train_limit, args.test_limit = 1, 2, 4, 400, 200
        args.cells = ",".join(QUICK_CELLS) if args.cells == ",".join(DEFAULT_CELLS) else args.cells
    by_name = {cell.name: cell for cell in CELLS}
    names = list(by_name) if args.cells == "all" else [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"unknown cell(s) {unknown}: accepted are {', '.join(by_name)} or 'all'", file=sys.stderr)
        return 2
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    cells = [by_name[n] for n in names]
    left_out = [c.name for c in CELLS if c.name not in names]
    print(f"cells: {', '.join(names)}; left out: {', '.join(left_out) or 'none'}; two-factor combinations left out")
    document: dict[str, Any] = {"benchmark": "ablate_csg", "runs": {}}
    if args.out.is_file():
        document = json.loads(args.out.read_text())
    done = document.setdefault("runs", {})
    # --target only reads the stored curves, so it may change between invocations
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cells", "arms", "timeout", "target")}
    if document.get("settings", settings) != settings:
        print(f"{args.out} was written under other settings: use another --out", file=sys.stderr)
        return 2
    document["settings"] = settings
    plan = [(cell, arm, seed) for seed in range(args.seeds) for cell in cells for arm in cell.arms if arm in arms]
    for number, (cell, arm, seed) in enumerate(plan, start=1):
        key = run_key(cell.name, arm, seed)
        if key in done:
            continue
        sets = {**base_sets(args, seed), **cell.settings()}
        run, rounds = run_fedcsg(arm, sets, timeout=args.timeout, config=args.config)
        done[key] = run_record(cell, arm, seed, rounds, run.seconds)
        print(
            f"[{number}/{len(plan)}] {cell.name} {arm} seed {seed}: final accuracy "
            f"{done[key]['final_accuracy']:.4f}, round-0 loss {done[key]['round0_loss']}, {run.seconds:.0f} s",
            flush=True,
        )
        document["left_out"] = left_out
        document["summary"] = summarize(list(done.values()), args.target)
        write_json(args.out, document)
    records = [done[run_key(c.name, a, s)] for c, a, s in plan if run_key(c.name, a, s) in done]
    document["left_out"] = left_out
    document["summary"] = summarize(records, args.target)
    document["target"] = args.target
    print()
    print_table(
        ["cell", "arm", "seeds", "final accuracy", f"mean of last {TAIL_ROUNDS} rounds", f"rounds to {args.target:g}"],
        table_rows(document["summary"]),
    )
    write_json(args.out, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
