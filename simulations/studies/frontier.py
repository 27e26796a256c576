"""The code-size frontier: final test accuracy against total wire bytes, csg and csg-frozen at several
code dims beside fedavg, fedpara and the codec arms, on one log-x axis.

Code size is CSG's knob: every filter slice is generated from a ``code-dim``-dimensional code (the
frozen arm's filters live in a code_dim-dimensional subspace of each slice), so a larger code sends
more bytes and may buy accuracy. ``code-dim`` is a run-wide setting, so every code dim is one real
``fedcsg compare`` (a fresh process, Flower's simulation engine on Ray) of the csg arms into
``OUT/code-dim-N``; the reference arms (whose models have no codes, or whose code dim is the
config's) are one more compare into ``OUT/reference``, or are read from an existing run directory
(``--reference DIR``, a run of the same config over these seeds or more, e.g. the headline run), which
also supplies the csg arms it holds at its code dim, so those are not run again. Each compare runs ``--seeds`` (one run
per seed, resumable per seed: a rerun resumes every directory that already exists).

Writes ``OUT/frontier.json`` (one point per arm and code dim: mean and std over the seeds of the
final accuracy and of the total wire bytes), ``OUT/frontier.png`` and prints the table.

Usage (the real run, see docs/frontier.md)::

    python3 -m simulations.studies.frontier --out runs/frontier
    python3 -m simulations.studies.frontier --out runs/frontier --reference runs/peers-seeds   # reuse reference arms
    python3 -m simulations.studies.frontier --out /tmp/f --code-dims 72,144 --seeds 0 --reference-arms fedavg \\
        --set num-rounds=1 --set train-limit=200 --set test-limit=100 --set num-clients=2 \\
        --set clients-per-round=2 --set min-train-nodes=2 --set min-available-nodes=2   # smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcsg.cli.args import OneLineParser
from fedcsg.cli.runs import parse_overrides
from fedcsg.runs.directory import saved_config
from fedcsg.runs.layout import RESULTS_JSON, differing_settings
from fedcsg.runs.summary import ArmSummary, seed_results, summarize
from fedcsg.spec.arms import Arm, check_arm
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import load_experiment
from simulations.benchlib import print_table, write_json

CONFIG = "cifar10-resnet20-peers"
CODE_DIMS = (72, 144, 288)
CSG_ARMS = ("csg", "csg-frozen")
REFERENCE_ARMS = ("fedavg", "fedpara", "fedavg+int8", "csg+int8", "csg-frozen+int8", "csg+int8/delta-int8")
SEEDS = "0,1"
REFERENCE_DIR = "reference"
# the reference points: distinct from the csg lines (C2, C3) and from one another
REFERENCE_COLOURS = ("C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9", "black", "olive", "navy", "teal")


def code_dim_dir(out: Path, code_dim: int) -> Path:
    return out / f"code-dim-{code_dim}"


def compare_command(
    out_dir: Path, arms: Sequence[str], config: str, seeds: str, sets: Sequence[str], code_dim: int | None
) -> list[str]:
    """The ``fedcsg compare`` of ``arms`` into ``out_dir`` (``--resume`` when it already exists)."""
    cmd = [sys.executable, "-m", "fedcsg.cli", "compare"]
    if out_dir.exists():
        return [*cmd, "--resume", str(out_dir)]
    cmd += ["--config", config, "--arms", ",".join(arms), "--seeds", seeds, "--out", str(out_dir)]
    for pair in [*sets, *([f"code-dim={code_dim}"] if code_dim is not None else [])]:
        cmd += ["--set", pair]
    return cmd


def plan(
    out: Path,
    code_dims: Sequence[int],
    config: str = CONFIG,
    seeds: str = SEEDS,
    sets: Sequence[str] = (),
    reference_arms: Sequence[str] = REFERENCE_ARMS,
    reference: Path | None = None,
    reused: Mapping[int, Collection[str]] | None = None,
) -> list[tuple[Path, list[str]]]:
    """Every compare to run, with the directory it fills: the csg arms at each code dim that
    ``reused`` (code dim: csg arms the reference run already holds, see :func:`reused_arms`) does not
    supply, then the reference arms at the config's code dim (none when ``reference`` names an
    existing run)."""
    runs = []
    for d in code_dims:
        arms = [a for a in CSG_ARMS if a not in (reused or {}).get(d, ())]
        if arms:
            runs.append((code_dim_dir(out, d), compare_command(code_dim_dir(out, d), arms, config, seeds, sets, d)))
    if reference is None and reference_arms:
        ref = out / REFERENCE_DIR
        runs.append((ref, compare_command(ref, reference_arms, config, seeds, sets, None)))
    return runs


def reused_arms(results: Mapping[str, Any], config: str, sets: Sequence[str]) -> dict[int, list[str]]:
    """The csg arms (plain, without a codec) that a reference run's ``results.json`` holds, by its code
    dim: the frontier takes those points from it instead of running them again.

    Raises
    ------
    ValueError
        If the reference was run under other settings than ``config`` with ``sets`` (its seeds,
        arms and code dim aside), so that its points would not lie on the same axes.
    """
    cfg = RunConfig.from_mapping(parse_overrides(list(sets)), load_experiment(config))
    recorded = results["config"]
    differing = [k for k in differing_settings(cfg.identity(), recorded) if k not in ("seed", "code-dim")]
    if differing:
        shown = ", ".join(
            f"{k} = {recorded.get(k)!r} (the frontier's {cfg.identity().get(k)!r})" for k in differing[:4]
        )
        raise ValueError(f"it was run under other settings: {shown}; accepted is a run of --config {config}")
    held = [arm for arm in results["summary"] if arm in CSG_ARMS]
    return {int(recorded["code-dim"]): held} if held else {}


def seeds_summary(results: dict[str, Any], seeds: Sequence[int] | None) -> dict[str, ArmSummary]:
    """The per-arm summary of ``results`` over ``seeds`` alone (all of its seeds when None), so that
    every point of the frontier is a spread over the same seeds, e.g. seeds 0 and 1 of a three-seed run.

    Raises
    ------
    ValueError
        If the run lacks one of ``seeds``.
    """
    per_seed = seed_results(results)
    if seeds is not None and "per_seed" in results:
        missing = [seed for seed in seeds if seed not in per_seed]
        if missing:
            raise ValueError(
                f"the reference run lacks seeds {', '.join(map(str, missing))}: accepted is a run over "
                f"seeds {', '.join(map(str, per_seed))} (pass --seeds among them)"
            )
        per_seed = {seed: per_seed[seed] for seed in seeds}
    return summarize(results["config"], per_seed)


def points(
    run_dir: Path, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One frontier point per arm of the report in ``run_dir`` (``results.json``, one seed or several):
    its code dim, and mean / std over ``seeds`` (default: the run's) of the final accuracy and of the
    total wire bytes."""
    results = json.loads((run_dir / RESULTS_JSON).read_text())
    code_dim = results["config"].get("code-dim")
    out = []
    for arm, figures in seeds_summary(results, seeds).items():
        if arms is not None and arm not in arms:
            continue
        accuracy, total = figures.final_accuracy, figures.total_wire_bytes
        has_codes = Arm.parse(arm).model in CSG_ARMS
        out.append(
            {
                "arm": arm,
                "code_dim": code_dim if has_codes else None,
                "label": f"{arm} @{code_dim}" if has_codes else arm,
                "final_accuracy": accuracy.mean,
                "final_accuracy_std": accuracy.std,
                "total_wire_bytes": total.mean,
                "total_wire_bytes_std": total.std,
                "seeds": accuracy.n,
                "run_dir": str(run_dir),
            }
        )
    return out


def collect(
    out: Path, code_dims: Sequence[int], reference: Path | None, seeds: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The points of every code dim's csg arms and of the reference run (``reference``, else
    ``OUT/reference`` when it exists), csg arms ordered by code dim; the reference's over ``seeds``
    only (a run over more seeds, such as the three-seed headline run, contributes the frontier's), its
    plain csg arms where no code-dim directory holds them (see :func:`reused_arms`)."""
    rows = [
        p
        for d in code_dims
        if (code_dim_dir(out, d) / RESULTS_JSON).is_file()
        for p in points(code_dim_dir(out, d), CSG_ARMS)
    ]
    ref = reference if reference is not None else out / REFERENCE_DIR
    if (ref / RESULTS_JSON).is_file():
        have = {(p["arm"], p["code_dim"]) for p in rows}
        rows += [
            p
            for p in points(ref, seeds=seeds)
            if p["code_dim"] is None
            or Arm.parse(p["arm"]).codec
            or (p["code_dim"] in code_dims and (p["arm"], p["code_dim"]) not in have)
        ]
    return sorted(
        rows, key=lambda p: (0, p["code_dim"], CSG_ARMS.index(p["arm"])) if p["arm"] in CSG_ARMS else (1, 0, 0)
    )


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[object]]:
    def pm(mean: float | None, std: float | None, scale: float, fmt: str) -> str:
        return "-" if mean is None else f"{mean / scale:{fmt}} ± {(std or 0.0) / scale:{fmt}}"

    return [
        [
            r["label"],
            pm(r["final_accuracy"], r["final_accuracy_std"], 1.0, ".4f"),
            pm(r["total_wire_bytes"], r["total_wire_bytes_std"], 1e6, ".3f"),
            r["seeds"],
        ]
        for r in rows
    ]


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Final accuracy against total wire bytes (log x), error bars of one std over the seeds; the
    csg and csg-frozen points joined in code-dim order and labelled with their code dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    for n, arm in enumerate(CSG_ARMS):
        line = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["code_dim"])
        if not line:
            continue
        ax.errorbar(
            [r["total_wire_bytes"] / 1e6 for r in line],
            [r["final_accuracy"] for r in line],
            xerr=[r["total_wire_bytes_std"] / 1e6 for r in line],
            yerr=[r["final_accuracy_std"] for r in line],
            marker="o",
            color=f"C{n + 2}",
            capsize=3,
            label=f"{arm} (code dim {', '.join(str(r['code_dim']) for r in line)})",
        )
        for r in line:
            ax.annotate(str(r["code_dim"]), (r["total_wire_bytes"] / 1e6, r["final_accuracy"]), fontsize=8)
    for n, r in enumerate(r for r in rows if r["arm"] not in CSG_ARMS):
        ax.errorbar(
            [r["total_wire_bytes"] / 1e6],
            [r["final_accuracy"]],
            xerr=[r["total_wire_bytes_std"] / 1e6],
            yerr=[r["final_accuracy_std"]],
            marker="sD^vPX<>"[n % 8],
            linestyle="none",
            color=REFERENCE_COLOURS[n % len(REFERENCE_COLOURS)],
            capsize=3,
            label=r["label"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("total wire bytes over the run (MB, up + down, log scale)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_code_dims(text: str) -> list[int]:
    """argparse type: comma-separated positive code dims."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers (e.g. 72,144,288)") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: positive integers, e.g. 72,144,288")
    return values


def frontier_config(config: str, sets: Sequence[str], seeds: str) -> RunConfig:
    """The config every compare of the frontier runs under (code dim aside): ``config`` with ``sets``
    and ``seeds``; a one-line ValueError for a bad file, key or value."""
    return RunConfig.from_mapping({**parse_overrides(list(sets)), "seeds": seeds}, load_experiment(config))


def check_existing(runs: Sequence[tuple[Path, list[str]]], cfg: RunConfig, code_dims: Sequence[int]) -> None:
    """Refuse, before any compare, a directory of the plan that already holds a run (which the plan
    resumes under its saved config) of other settings or seeds than the frontier's."""
    for run_dir, _ in runs:
        if not run_dir.exists():
            continue
        code_dim = next((d for d in code_dims if run_dir.name == code_dim_dir(run_dir.parent, d).name), None)
        expected = cfg.replace(code_dim=code_dim) if code_dim is not None else cfg
        saved = saved_config(run_dir)
        differing = differing_settings(expected.identity(), saved.identity())
        if saved.seed_list != expected.seed_list:
            differing = ["seeds", *differing]
        if differing:
            raise ValueError(
                f"{str(run_dir)!r} holds a run of other settings ({', '.join(differing[:5])} differ), which a rerun "
                "would resume as it is: accepted are the --config, --set and --seeds it was run with, or another --out"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="frontier.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--config", default=CONFIG, help=f"experiment (default {CONFIG})")
    parser.add_argument("--code-dims", type=parse_code_dims, default=list(CODE_DIMS), help="default 72,144,288")
    parser.add_argument("--seeds", default=SEEDS, help=f"default {SEEDS}")
    parser.add_argument(
        "--reference-arms", default=",".join(REFERENCE_ARMS), help="arms run once at the config's code dim"
    )
    parser.add_argument("--reference", type=Path, help="read the reference arms from this run instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every compare")
    parser.add_argument("--report-only", action="store_true", help="run nothing; plot what OUT holds")
    args = parser.parse_args(argv)
    if args.reference is not None and not (args.reference / RESULTS_JSON).is_file():
        parser.error(f"--reference {str(args.reference)!r} holds no {RESULTS_JSON}: accepted is a reported run")
    try:  # the run setting's own parser and bounds, before any compare runs
        seeds = RunConfig(seeds=args.seeds).seed_list
    except ValueError as error:
        parser.error(f"--seeds: {error}")
    reused: dict[int, list[str]] = {}
    if args.reference is not None:
        try:  # before any compare runs: the reference must hold the frontier's seeds, under its settings
            results = json.loads((args.reference / RESULTS_JSON).read_text())
            seeds_summary(results, seeds)
            reused = reused_arms(results, args.config, args.set)
        except ValueError as error:
            parser.error(f"--reference {str(args.reference)!r}: {error}")
    try:  # every arm, key and value, and every run the plan would resume, before any compare runs
        reference_arms = [check_arm(a.strip()) for a in args.reference_arms.split(",") if a.strip()]
        cfg = frontier_config(args.config, args.set, args.seeds)
        runs = plan(args.out, args.code_dims, args.config, args.seeds, args.set, reference_arms, args.reference, reused)
        if not args.report_only:  # a report runs nothing: it reads what OUT holds, whatever its settings
            check_existing(runs, cfg, args.code_dims)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    if not args.report_only:
        for run_dir, cmd in runs:
            print("$", " ".join(cmd[1:]), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            walls[run_dir.name] = round(time.perf_counter() - start, 1)
    rows = collect(args.out, args.code_dims, args.reference, seeds)
    print_table(["arm", "final accuracy", "total wire MB", "seeds"], table_rows(rows))
    plot(rows, args.out / "frontier.png", f"code-size frontier: {args.config}, seeds {args.seeds}")
    write_json(
        args.out / "frontier.json",
        {"config": args.config, "seeds": args.seeds, "sets": args.set, "wall_seconds": walls, "points": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
