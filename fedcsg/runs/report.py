"""The report of a federated run, built from its round records (see :mod:`fedcsg.runs.records`)::

    DIR/results.json         config, versions, seed, every arm's round records and its summary
    DIR/results.csv          one row per arm and round
    DIR/report.md            per-arm summary: accuracy, bytes per round, totals, ratio to fedavg
    DIR/accuracy_vs_bytes.png, DIR/accuracy_vs_round.png

A run over several seeds holds one run per seed in ``DIR/seed-N/``, and in ``DIR`` itself
results.json, results.csv, report.md and the plots over the seeds: per arm the mean and standard
deviation (sample, n - 1) of the final accuracy, the mean accuracy of the last three rounds, the
total bytes, the resync bytes of a delta downlink and the bytes to the target accuracy and to
fedavg's final accuracy - 1 point, and per round the mean accuracy with a band from the lowest to the
highest seed. Which arm needs the fewest bytes is said by :data:`fedcsg.runs.winner.WINNER_RULE`.

Both come from one path: a one-seed run is summarized as a run over its one seed
(:func:`fedcsg.runs.summary.summarize`: an :class:`~fedcsg.runs.summary.ArmSummary` per arm, the
``summary`` of results.json), and one writer and one table of columns write either report; a one-seed
report shows a seed's detail (payload bytes, seconds, devices, faults), one over seeds the spreads.

Every JSON file is strict (:func:`fedcsg.io.strict_json`): no NaN or Infinity.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcsg.io import atomic_write_text, strict_json
from fedcsg.runs.layout import (
    REPORT_MD,
    RESULTS_CSV,
    RESULTS_JSON,
    arm_record_files,
    differing_settings,
    holds_arms,
    seed_dirs_in,
    shown_differences,
)
from fedcsg.runs.plots import plot_accuracy, plot_accuracy_vs_epsilon
from fedcsg.runs.records import ROUND_FIELDS, read_arm_record
from fedcsg.runs.summary import (
    LAST_ROUNDS,
    ArmSummary,
    Spread,
    load_results,
    metric_names,
    rounds_by_number,
    seed_results,
    summarize,
    summary_records,
)
from fedcsg.runs.winner import WINNER_RULE, accuracy_noise_sentence, fewest_bytes_over_seeds, one_seed_bytes_sentence
from fedcsg.spec.arms import arm_order
from fedcsg.spec.checks import parse_seeds, shown
from fedcsg.spec.config import identity_of


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pm(spread: Spread, fmt: str, scale: float = 1.0) -> str:
    """Mean ± std, with the count of seeds where it is not every seed's; "not reached" in none."""
    if spread.mean is None or spread.std is None:
        return "not reached"
    text = f"{spread.mean / scale:{fmt}} ± {spread.std / scale:{fmt}}"
    total = len(spread.values)
    return text if spread.n == total else f"{text} ({spread.n} of {total} seeds)"


def _figure(spread: Spread, over_seeds: bool, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """A figure's cell: over seeds its mean ± std (:func:`_pm`), in a one-seed run its value; "not
    reached" where there is none."""
    if spread.mean is None:
        return "not reached"
    return (_pm(spread, fmt, scale) if over_seeds else f"{spread.mean / scale:{fmt}}") + unit


def _mb(spread: Spread, over_seeds: bool = False) -> str:
    return _figure(spread, over_seeds, ".3f", 1e6, " MB")


def _reach(wire: Spread, round_: Spread, over_seeds: bool) -> str:
    """The wire bytes to a goal, and in a one-seed run the round that reached it."""
    no_round = over_seeds or round_.values[0] is None
    return _mb(wire, over_seeds) + ("" if no_round else f" (round {round_.values[0]:g})")


def _resynced(s: ArmSummary) -> str:
    """A one-seed run's resynced messages and their wire bytes, "-" for none."""
    return f"{s.resynced.values[0]} ({_mb(s.wire_down_resync)})" if s.resynced.values[0] else "-"


@dataclass(frozen=True)
class _Column:
    """A column of the arms' table; ``over_seeds`` True or False for a column only the report over
    seeds, or only a one-seed run's, holds (None: both)."""

    header: str
    cell: Callable[[ArmSummary, bool], str]
    align: str = "---:"
    over_seeds: bool | None = None


def _spread_column(header: str, figure: str, fmt: str, over_seeds: bool | None = None) -> _Column:
    return _Column(header, lambda s, over: _figure(getattr(s, figure), over, fmt), over_seeds=over_seeds)


def _mb_column(header: str, figure: str, over_seeds: bool | None = None) -> _Column:
    return _Column(header, lambda s, over: _mb(getattr(s, figure), over), over_seeds=over_seeds)


def _columns(short: str, target: float) -> list[_Column]:
    """Every column of the arms' table, in order: a one-seed run's table shows its payload bytes, resynced
    messages, upload ratio and seconds, a table over seeds the last rounds' accuracy, the round to the
    target and each seed's final accuracy (each seed's own report has the rest)."""
    return [
        _Column("arm", lambda s, over: s.arm, "---"),
        _Column("up", lambda s, over: s.uplink, "---"),
        _Column("down", lambda s, over: s.downlink, "---"),
        _spread_column(f"final {short}", "final_accuracy", ".4f"),
        _spread_column(f"best {short}", "best_accuracy", ".4f"),
        _spread_column(f"last {LAST_ROUNDS} rounds {short}", "last_accuracy", ".4f", over_seeds=True),
        _mb_column("payload up / round", "payload_up_per_round", over_seeds=False),
        _mb_column("payload down / round", "payload_down_per_round", over_seeds=False),
        _mb_column("wire up / round", "wire_up_per_round"),
        _mb_column("wire down / round", "wire_down_per_round"),
        _Column("resynced", lambda s, over: _resynced(s), over_seeds=False),
        _Column(
            "resync wire", lambda s, over: _mb(s.wire_down_resync, over) if s.resynced.mean else "-", over_seeds=True
        ),
        _mb_column("total wire", "total_wire_bytes"),
        _Column("upload ratio vs fedavg", lambda s, over: _times(s.upload_ratio_vs_fedavg), over_seeds=False),
        _Column("total ratio vs fedavg", lambda s, over: _times(s.total_ratio_vs_fedavg)),
        _Column(
            f"wire bytes to {target:.0%} {short}",
            lambda s, over: _reach(s.wire_bytes_to_target, s.round_to_target, over),
        ),
        _spread_column(f"round to {target:.0%}", "round_to_target", ".1f", over_seeds=True),
        _Column(
            "wire bytes to fedavg - 1 pt",
            lambda s, over: (
                "-" if s.match_accuracy.mean is None else _reach(s.wire_bytes_to_match, s.round_to_match, over)
            ),
        ),
        _spread_column("seconds", "seconds", ".1f", over_seeds=False),
        _Column(
            f"per seed: final {short}",
            lambda s, over: ", ".join("-" if v is None else f"{v:.4f}" for v in s.final_accuracy.values),
            "---",
            over_seeds=True,
        ),
    ]


def _table_lines(summary: dict[str, ArmSummary], over_seeds: bool, short: str) -> list[str]:
    """The arms' table: one row per arm, the columns of a one-seed run or of a run over seeds."""
    target = next(iter(summary.values())).target_accuracy
    columns = [c for c in _columns(short, target) if c.over_seeds in (None, over_seeds)]
    rows = [[c.header for c in columns], [c.align for c in columns]]
    rows += [[c.cell(s, over_seeds) for c in columns] for s in summary.values()]
    return ["| " + " | ".join(row) + " |" for row in rows]


def _goal_names(target: float, match: float | None, metric: str) -> tuple[str, str]:
    match_text = f"fedavg's final {metric} - 1 point" + ("" if match is None else f" ({match:.2%})")
    return f"the target {metric} {target:.0%}", match_text


def _title(config: dict[str, Any], seeds: list[Any], over_seeds: bool) -> str:
    """What the run is, for the report's title and the plots': model, data set, and the seeds' count."""
    return f"{config.get('model')} on {config.get('dataset')}" + (f", {len(seeds)} seeds" if over_seeds else "")


def _setup(cfg: dict[str, Any]) -> str:
    """The run's setup in one sentence (clients, partitions, rounds, CSG and server settings)."""
    return (
        f"{cfg.get('num-clients')} clients, partitioner {cfg.get('partitioner')}"
        + (f" (alpha {cfg.get('dirichlet-alpha')})" if cfg.get("partitioner") == "dirichlet" else "")
        + f", {cfg.get('num-rounds')} rounds, {cfg.get('local-epochs')} local epoch(s), "
        f"slice {cfg.get('slice')} / code dim {cfg.get('code-dim')}, "
        + ", ".join(f"{key} {cfg.get(key)}" for key in ("csg-init", "server-optimizer", "csg-aggregation"))
    )


def _node_download_lines(summary: dict[str, ArmSummary]) -> list[str]:
    """The deployment's table of what one node downloads in all (empty for a simulation)."""
    deployed = {arm: s for arm, s in summary.items() if s.bundle_bytes.mean is not None}
    if not deployed:
        return []
    lines = [
        "",
        "## What one node downloads",
        "",
        "Each SuperNode downloaded the app bundle once for the run (the serialized `GetFab` reply) "
        "before its first round; the total is that of a node sampled in every round.",
        "",
        "| arm | app bundle, once | wire down / round / node | rounds | total download / node |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for arm, s in deployed.items():
        (bundle,), (total,), (rounds,) = s.bundle_bytes.values, s.node_download_bytes.values, s.rounds.values
        lines.append(
            f"| {arm} | {bundle:,} B | {(total - bundle) / rounds / 1e6:.3f} MB | {rounds} | "
            f"{total:,} B ({_mb(s.node_download_bytes)}) |"
        )
    return lines


def device_lines(summary: dict[str, ArmSummary]) -> list[str]:
    """The table of where each arm computed: its clients' devices (aggregated replies per device,
    from the rounds' ``devices``) and the server's; none for records that name no device (older runs)."""
    if not any(s.client_devices or s.server_devices for s in summary.values()):
        return []
    lines = [
        "",
        "Where each arm computed: the devices its clients trained on (aggregated replies per device; "
        "`devices` and `visible_devices` per round in results.csv) and the server's device.",
        "",
        "| arm | clients trained on | server evaluated on |",
        "| --- | --- | --- |",
    ]
    for arm, s in summary.items():
        clients = ", ".join(f"{device} ({count})" for device, count in s.client_devices.items()) or "-"
        lines.append(f"| {arm} | {clients} | {', '.join(s.server_devices) or '-'} |")
    return lines


def _step(values: list[float]) -> str:
    return f"{values[-1]:.4f} / {sum(values) / len(values):.4f}" if values else "-"


def _filter_step_lines(results: dict[str, Any]) -> list[str]:
    """The table of each arm's filter step (``filter_step``, ``client_filter_step``): the final
    measured round's and the mean over the measured rounds; empty when no round measured one."""
    steps = {
        arm: [
            [r[key] for r in data["rounds"] if r.get(key) is not None] for key in ("filter_step", "client_filter_step")
        ]
        for arm, data in results["arms"].items()
    }
    if not any(any(values) for values in steps.values()):
        return []
    lines = [
        "",
        "## Filter step",
        "",
        "How far each round moved the conv filters (generated ones for CSG layers, FedPara's products, plain "
        "weights), |W_after - W_before| / |W_before| over all of them, measured on the decoded payloads the "
        "server averages: *global* is the global model's change over the round, *client* the mean over the "
        "round's clients of a client's change in its local training (`filter_step`, `client_filter_step` "
        "in results.csv).",
        "",
        "| arm | global step, final round / mean | client step, final round / mean | client / global, mean |",
        "| --- | ---: | ---: | ---: |",
    ]
    for arm, (global_steps, client_steps) in steps.items():
        ratio = (
            f"{sum(client_steps) / sum(global_steps):.2f}x"
            if global_steps and client_steps and sum(global_steps)
            else "-"
        )
        lines.append(f"| {arm} | {_step(global_steps)} | {_step(client_steps)} | {ratio} |")
    return lines


def _privacy_lines(cfg: dict[str, Any], results: dict[str, Any], over_seeds: bool = False) -> list[str]:
    """The privacy section of a run with ``dp`` (``cfg``): per arm of one seed's ``results`` the accountant's
    epsilon after its last round and the accuracy it bought, and a sentence on what the epsilon means;
    empty without DP."""
    if cfg.get("dp", "none") == "none":
        return []
    lines = [
        "",
        "## Privacy",
        "",
        f"Differential privacy `{cfg['dp']}` (docs/privacy.md): updates clipped to L2 norm "
        f"{cfg['dp-clipping-norm']:g}{' (adapted each round)' if cfg['dp'] == 'central-adaptive' else ''}, "
        f"noise multiplier {cfg['dp-noise-multiplier']:g}. *epsilon* is Flower's RDP accountant's, at delta "
        f"{cfg['dp-target-delta']:g}, client-level, without amplification by sampling (`epsilon` in results.csv "
        "per round; accuracy_vs_epsilon.png)."
        + (
            " The table is the first seed's: every seed spends the same epsilon in the same rounds unless one of "
            "its rounds failed (each seed's report has its own)."
            if over_seeds
            else ""
        ),
        "",
        "| arm | epsilon after the last round | final accuracy | rounds | stopped by dp-max-epsilon |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for arm, data in results["arms"].items():
        rounds = [r for r in data["rounds"] if r.get("epsilon") is not None]
        if not rounds:
            continue
        last = rounds[-1]
        stopped = data.get("stopped_by_privacy") or "no"
        lines.append(f"| {arm} | {last['epsilon']:.4g} | {last['test_accuracy']:.4f} | {last['round']} | {stopped} |")
    return lines


def _intro_lines(config: dict[str, Any], first: dict[str, Any], seeds: list[Any], over_seeds: bool) -> list[str]:
    """The report's title, setup and what its figures are, down to the arms' table."""
    short, metric = metric_names(config)
    if not over_seeds:
        return [
            f"# fedcsg report: {_title(config, seeds, over_seeds)}",
            "",
            f"{_setup(config)}, seed {seeds[0]}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()),
            "",
            "Bytes are per round (the mean over the rounds), summed over the sampled clients. *Payload* is raw "
            "tensor bytes; *wire* is the serialized Flower messages (payload, array headers, keys, config and "
            f"metadata). *{short}* is the test {metric}; it is one seed: byte counts are exact, but a difference "
            "of a few points between arms can be noise (`--seeds 0,1,2` gives the spread).",
            "",
            "*up* / *down* say how each arm's updates and global model travelled (fedcsg.spec.codecs, "
            "fedcsg.wire.downlink). *Resynced* counts the messages of a delta downlink that carried the model in "
            "full (a node not known to hold the previous one) and their wire bytes, over the run; results.csv has "
            "them per round (`resynced`, `wire_down_resync`; the in-sync share is `wire_down - wire_down_resync`).",
            "",
        ]
    return [
        f"# fedcsg report: {_title(config, seeds, over_seeds)}",
        "",
        f"{_setup(config)}, seeds {', '.join(map(str, seeds))} (each seed: its own partitions, initial model, "
        "sampling and augmentation; "
        "every arm of a seed on the same ones). Each seed's own report is in seed-N/report.md.",
        "",
        "Figures are mean ± sample standard deviation over the seeds. That spread holds the seeds' own "
        "luck, which every arm of a seed shares: differences between arms are judged seed by seed (below).",
        "",
        f"*{short}* is the test {metric}. *Last {LAST_ROUNDS} rounds* is its mean over a seed's last "
        f"{LAST_ROUNDS} rounds. "
        "*Resync wire* is what a delta downlink sent in full to nodes not known to hold its previous model, "
        "over the run (part of *wire down* and *total wire*; `-` for the other downlinks).",
        "",
    ]


def _goal_lines(summary: dict[str, ArmSummary], over_seeds: bool, metric: str) -> list[str]:
    """Which arm needs the fewest wire bytes to the target and to fedavg - 1 point: over seeds by
    :data:`WINNER_RULE`, in a one-seed run said as one seed; and over seeds, which accuracy
    differences are within noise."""
    first = next(iter(summary.values()))
    match = first.match_accuracy.mean
    to_target, to_match = _goal_names(first.target_accuracy, match, metric)
    goals = [("wire_bytes_to_target", to_target)] + ([("wire_bytes_to_match", to_match)] if match is not None else [])
    per_seed = [({arm: getattr(s, figure).values for arm, s in summary.items()}, goal) for figure, goal in goals]
    if not over_seeds:
        return ["", *(one_seed_bytes_sentence({a: v[0] for a, v in values.items()}, goal) for values, goal in per_seed)]
    lines = ["", WINNER_RULE, "", *(fewest_bytes_over_seeds(values, goal) for values, goal in per_seed)]
    for figure, label in (
        ("final_accuracy", f"final {metric}"),
        ("last_accuracy", f"{metric} of the last {LAST_ROUNDS} rounds"),
    ):
        sentence = accuracy_noise_sentence({a: getattr(s, figure) for a, s in summary.items()}, label)
        if sentence:
            lines += ["", sentence]
    return lines


def _unfinished_lines(config: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The arms (of each seed) whose records end before the run's last round: a run in progress or
    stopped (by a signal, a failure or ``dp-max-epsilon``), whose figures are those of its last round."""
    planned = config.get("num-rounds")
    if planned is None:
        return []
    unfinished = [
        f"{arm}{f' (seed {seed})' if len(per_seed) > 1 else ''} after round {last} of {planned}"
        for seed, results in per_seed.items()
        for arm, data in results["arms"].items()
        if (last := max((r["round"] for r in data["rounds"]), default=0)) < planned
    ]
    if not unfinished:
        return []
    return [
        "",
        f"Not finished: {'; '.join(unfinished)}. Each such arm's figures are those of its last recorded round "
        "(`--resume DIR` continues an interrupted run).",
    ]


def _fault_lines(summary: dict[str, ArmSummary]) -> list[str]:
    """A one-seed run's client faults, per arm that had any; none without."""
    faults = [
        f"{arm}: {s.failed_rounds.values[0]} failed round(s), {s.failed_replies.values[0]} failed and "
        f"{s.rejected_replies.values[0]} rejected client replies"
        for arm, s in summary.items()
        if s.failed_rounds.mean or s.failed_replies.mean or s.rejected_replies.mean
    ]
    if not faults:
        return []
    return ["", "Client faults (`failed`, `rejected`, `status` in results.csv): " + "; ".join(faults) + "."]


def _head(
    config: dict[str, Any], per_seed: dict[int, dict[str, Any]], summary: dict[str, ArmSummary], over_seeds: bool
) -> list[str]:
    """The report's lines down to its per-round table, of a one-seed run (``per_seed`` of its one seed)
    or of a run over seeds: a one-seed run's has the sections of what its arms did (node downloads,
    devices, filter steps, client faults), which a run over seeds leaves to each seed's report; both have
    the privacy section (over seeds, the first seed's)."""
    first = next(iter(per_seed.values()))
    short, metric = metric_names(config)
    lines = _intro_lines(config, first, list(per_seed), over_seeds) + _table_lines(summary, over_seeds, short)
    lines += _unfinished_lines(config, per_seed) + _goal_lines(summary, over_seeds, metric)
    if not over_seeds:
        lines += _node_download_lines(summary) + device_lines(summary) + _filter_step_lines(first)
    lines += _privacy_lines(config, first, over_seeds)
    return lines if over_seeds else lines + _fault_lines(summary)


PLOT_LINES = ["", "![accuracy vs bytes](accuracy_vs_bytes.png)", "", "![accuracy vs round](accuracy_vs_round.png)", ""]


def _rounds_lines(
    config: dict[str, Any], per_seed: dict[int, dict[str, Any]], arms: list[str], over_seeds: bool
) -> list[str]:
    """The report's per-round table of ``arms`` (a one-seed run: its accuracy; a run over seeds, even
    one: mean ± std over them) and its plots."""
    over = " (mean ± std over the seeds)" if over_seeds else ""
    lines = ["", f"## Test {metric_names(config)[1]} per round{over}", ""]
    lines.append("| round | " + " | ".join(arms) + " |")
    lines.append("| ---: | " + " | ".join("---:" for _ in arms) + " |")
    table = {arm: rounds_by_number(per_seed, arm) for arm in arms}
    for rnd in sorted({r for arm in arms for r in table[arm]}):
        values = {arm: [r["test_accuracy"] for r in table[arm][rnd]] for arm in arms if rnd in table[arm]}
        cells = [
            "" if arm not in values else _pm(Spread.of(values[arm]), ".4f") if over_seeds else f"{values[arm][0]:.4f}"
            for arm in arms
        ]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    return [*lines, *PLOT_LINES]


def _document(per_seed: dict[int, dict[str, Any]], summary: dict[str, ArmSummary], over_seeds: bool) -> dict[str, Any]:
    """The results.json of a one-seed run (its results and ``summary``) or of a run over seeds (its
    config without the seed, the seeds, ``summary`` and each seed's summary and records)."""
    records = summary_records(summary)
    first = next(iter(per_seed.values()))
    if not over_seeds:
        return {**first, "summary": records}
    return {
        "config": {k: v for k, v in first["config"].items() if k != "seed"},
        "seeds": list(per_seed),
        "versions": first.get("versions", {}),
        "summary": records,
        "per_seed": {str(seed): {"summary": r["summary"], "arms": r["arms"]} for seed, r in per_seed.items()},
    }


def _write_run(out_dir: Path, per_seed: dict[int, dict[str, Any]], over_seeds: bool) -> dict[str, Any]:
    """Write ``out_dir``'s results.json, results.csv (a row per arm, seed in a run over seeds, and round),
    and, when any arm trained a round, report.md and the plots, from each seed's results (``per_seed``:
    a one-seed run's one, or :func:`write_report`'s of each seed); returns the results.json document."""
    config = next(iter(per_seed.values()))["config"]
    summary = summarize(config, per_seed)
    document = _document(per_seed, summary, over_seeds)
    arms = arm_order(sorted({arm for results in per_seed.values() for arm in results["arms"]}))
    atomic_write_text(out_dir / RESULTS_JSON, strict_json(document))
    rows = [
        {"arm": arm, **({"seed": seed} if over_seeds else {}), **{k: _csv_cell(r.get(k)) for k in ROUND_FIELDS}}
        for arm in arms
        for seed, seed_results in per_seed.items()
        for r in seed_results["arms"].get(arm, {}).get("rounds", [])
    ]
    _write_csv(out_dir / RESULTS_CSV, ["arm", *(["seed"] if over_seeds else []), *ROUND_FIELDS], rows)
    if summary:
        head = _head(document["config"], per_seed, summary, over_seeds)
        atomic_write_text(out_dir / REPORT_MD, "\n".join(head + _rounds_lines(config, per_seed, arms, over_seeds)))
        title, metric = _title(config, list(per_seed), over_seeds), metric_names(config)[1]
        plot_accuracy(per_seed, arms, title, out_dir, metric)
        if config.get("dp", "none") != "none":
            plot_accuracy_vs_epsilon(per_seed, arms, title, out_dir, metric)
    return document


def report_summary(results: dict[str, Any]) -> str:
    """The report's text down to its per-round table, from the results :func:`write_report` returns
    (one seed or several): what ``fedcsg run`` / ``compare`` print when they finish."""
    per_seed = seed_results(results)
    summary = summarize(results["config"], per_seed)
    return "\n".join(_head(results["config"], per_seed, summary, "per_seed" in results)).strip()


def _csv_cell(value: Any) -> Any:
    """A list as one CSV cell: its items space-separated, or "; "-separated where an item holds a
    space (a device's name, ``cuda:0 NVIDIA H100 80GB HBM3``)."""
    if not isinstance(value, list):
        return value
    items = list(map(str, value))
    return ("; " if any(" " in item for item in items) else " ").join(items)


def run_seeds(out_dir: Path) -> dict[int, Path]:
    """The seed directories of the run in ``out_dir`` that hold records, by seed: those whose seed is in
    the ``seeds`` of the newest record (a folder left by an earlier run over other seeds is left out,
    with a warning naming it)."""
    found = {seed: path for seed, path in seed_dirs_in(out_dir).items() if holds_arms(path)}
    records = [record for path in found.values() for record in arm_record_files(path)]
    if not records:
        return found
    newest = max(records, key=lambda record: record.stat().st_mtime_ns)
    listed = read_arm_record(newest)["config"].get("seeds")
    try:
        wanted = set(parse_seeds(listed)) if isinstance(listed, str) and listed.strip() else set(found)
    except ValueError as error:
        raise ValueError(f"{str(newest)!r} is not a fedcsg record: its config's {error}") from None
    for seed in sorted(set(found) - wanted):
        print(f"report: {found[seed]} left out: seed {seed} is not one of the run's seeds {listed}", file=sys.stderr)
    return {seed: path for seed, path in found.items() if seed in wanted}


def check_records(out_dir: Path) -> dict[int, Path]:
    """Read and check every arm record of the run in ``out_dir`` (:func:`~fedcsg.runs.records.read_arm_record`),
    and that all of them were recorded under one config (arm and seed aside), each seed directory's
    under its own seed; a one-line ValueError naming the file otherwise. Returns :func:`run_seeds`."""
    seeds = run_seeds(out_dir)
    reference: tuple[Path, dict[str, Any]] | None = None
    for seed, directory in [(None, out_dir), *seeds.items()]:
        for path in arm_record_files(directory):
            config = read_arm_record(path)["config"]
            if seed is not None and config.get("seed") != seed:
                raise ValueError(f"{str(path)!r} records seed {shown(config.get('seed'))}, not {seed} of its folder")
            identity = {k: v for k, v in config.items() if k != "seed"}
            if reference is None:
                reference = (path, identity_of(identity))
            elif differing_settings(reference[1], identity):
                raise ValueError(
                    f"{str(path)!r} was recorded under another config than {str(reference[0])!r} "
                    f"({shown_differences(reference[1], identity)} differ): accepted is one run's records"
                )
    return seeds


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """(Re)build results.json, results.csv, report.md and the plots from ``DIR/arms/*.json``, or,
    for a run over several seeds, each ``DIR/seed-N`` and then ``DIR``'s files over the seeds; returns
    ``DIR``'s results.json document."""
    out_dir = Path(out_dir)
    seeds = check_records(out_dir)  # every record checked before any file is written
    if seeds and not holds_arms(out_dir):
        return _write_run(out_dir, {seed: write_report(path) for seed, path in seeds.items()}, over_seeds=True)
    results = load_results(out_dir)
    return _write_run(out_dir, {results["seed"]: results}, over_seeds=False)


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, table.getvalue())
