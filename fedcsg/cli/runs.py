"""``fedcsg run``, ``compare``, ``configs`` and ``report``: federated simulations and their reports."""

from __future__ import annotations

import argparse
import functools
import sys
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from fedcsg.io import read_json_object, writable_dir
from fedcsg.runs.directory import (
    arm_progress,
    arms_in,
    canonical,
    check_run_dirs,
    default_out,
    prepare_out_dir,
    remove_torn_writes,
    resume_config,
    seed_runs,
)
from fedcsg.runs.layout import REPORT_MD, arm_record_path
from fedcsg.spec.arms import MODELS, check_arm
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import DEFAULT_EXPERIMENT, load_experiment, shipped_experiments
from fedcsg.wire.payload import PayloadLayout


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as run settings: a TOML value, else a bare word as a string."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r} is not KEY=VALUE (e.g. --set num-rounds=2)")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text.strip()  # a bare word is a string
    return values


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set KEY=VALUE pairs, and --seeds as the run setting ``seeds``."""
    values = parse_overrides(args.set or [])
    if getattr(args, "seeds", None) is not None:
        values["seeds"] = args.seeds
    return values


def resolve_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_experiment(args.config or DEFAULT_EXPERIMENT)
    overrides = _overrides(args)
    return canonical(RunConfig.from_mapping(overrides, cfg) if overrides else cfg)


def preflight(cfg: RunConfig, arms: list[str]) -> tuple[RunConfig, float]:
    """Everything checkable before a byte is written: find and read the labels of both splits (cheap),
    so a bad data path or a label out of range fails before anything runs, and the header of every
    image (a null or undecodable image, or one of the wrong size or too many pixels); check the
    settings against their sizes (:meth:`~fedcsg.spec.settings.DataSettings.check_sizes`); check that
    each arm's model fits in memory; on an attached cluster that every node can open the data too (a
    node started without them fails here, in seconds, not in every client of every round).

    Returns ``cfg`` with its clients' GPU share and the server's device resolved for the Ray it runs on
    (:func:`~fedcsg.fl.ray_cluster.resolve_resources`, which refuses ``device = "cuda"`` without a GPU
    share and a client that no node can host), and the GPUs of that Ray's largest node."""
    import torch

    from fedcsg.data.readers import check_images, load_labels
    from fedcsg.fl.privacy import check_accounting
    from fedcsg.fl.ray_cluster import most_on_a_node, ray_nodes, resolve_resources
    from fedcsg.fl.run_data import data_problem

    where = cfg.data_settings.source
    sizes = [len(load_labels(cfg.dataset, split, **where)) for split in ("train", "test")]
    for split in ("train", "test"):
        check_images(cfg.dataset, split, **where)
    cfg.data_settings.check_sizes(*sizes, num_clients=cfg.num_clients)
    check_accounting(cfg)
    for arm in arms:
        cfg.model_settings(arm).check_size()
    nodes = ray_nodes(cfg.ray_address, functools.partial(data_problem, cfg.data_settings))
    gpus = most_on_a_node(nodes, "GPU")
    resolved = resolve_resources(cfg, nodes, torch.cuda.is_available())
    client_device = "cuda" if resolved.client_num_gpus > 0 and resolved.device != "cpu" else "cpu"
    for device in {client_device, resolved.server_device}:  # this machine's CPU or GPU stands for the nodes'
        if device == "cpu" or torch.cuda.is_available():
            resolved.execution(device).check(torch.device(device))
    return resolved, gpus


def asks_for_gpus(cfg: RunConfig) -> bool:
    """Whether a setting of ``cfg`` (as given, before "auto" is resolved) asks for GPUs for the clients."""
    return cfg.device == "cuda" or (cfg.client_num_gpus != "auto" and float(cfg.client_num_gpus) > 0)


def cpu_clients_line(runs: list[RunConfig], gpus: float) -> str:
    """ "" unless the Ray cluster had ``gpus`` > 0 and clients of ``runs`` trained on the CPU all the
    same; then one line saying how many replies of which arms did."""
    if gpus <= 0:
        return ""
    on_cpu: dict[str, list[int]] = {}
    for cfg in runs:
        rounds = read_json_object(arm_record_path(Path(cfg.out_dir), cfg.arm))["rounds"]
        devices = [device for r in rounds for device in r.get("devices") or []]
        if any(device == "cpu" for device in devices):
            on_cpu[cfg.arm] = [sum(device == "cpu" for device in devices), len(devices)]
    if not on_cpu:
        return ""
    counts = ", ".join(f"{arm} {cpu} of {total}" for arm, (cpu, total) in on_cpu.items())
    return (
        f"clients trained on the CPU although the Ray cluster has {gpus:g} GPU(s) on a node ({counts} replies): "
        "their process saw no CUDA device (CUDA_VISIBLE_DEVICES is in each round's visible_devices)"
    )


def _simulate(runs: list[RunConfig], out_dir: Path, verbose: bool) -> None:
    """Run ``runs`` (one arm of one seed each, with its ``out_dir``) in one Flower simulation and
    check that each recorded every round; if one of them trained nothing
    (:class:`~fedcsg.runs.records.RunFailed`), the report of what was recorded is written first."""
    from fedcsg.fl.simulation import simulate
    from fedcsg.runs.records import RunFailed

    if not runs:
        return
    try:
        simulate(runs, verbose=verbose)
    except RunFailed:
        _write_report(out_dir)
        raise
    for cfg in runs:
        document = read_json_object(arm_record_path(Path(cfg.out_dir), cfg.arm))
        recorded = [r["round"] for r in document["rounds"]]
        # an arm that dp-max-epsilon stopped recorded the rounds within the budget
        last = recorded[-1] if "stopped_by_privacy" in document and recorded else cfg.num_rounds
        if recorded != list(range(last + 1)):
            raise RuntimeError(f"arm {cfg.arm!r} recorded rounds {recorded}, not 0..{last}")


def _write_report(out_dir: Path) -> dict[str, Any]:
    from fedcsg.runs.report import write_report

    return write_report(out_dir)


class Placement(NamedTuple):
    """What :func:`_finish` checks the clients' devices against: the GPUs of the Ray's largest node,
    and whether a setting asked for GPUs (then clients on the CPU fail the run)."""

    gpus: float
    asked: bool


def _resolved(cfg: RunConfig, arms: list[str]) -> tuple[RunConfig, Placement]:
    """:func:`preflight`'s resolved config, with what the given one asked for."""
    resolved, gpus = preflight(cfg, arms)
    return resolved, Placement(gpus, asks_for_gpus(cfg))


def _finish(out_dir: Path, runs: list[RunConfig], placement: Placement) -> int:
    """Write the report and print its summary; then, where clients trained on the CPU on a cluster with
    GPUs, one line saying so, which fails the run when a setting asked for GPUs."""
    from fedcsg.runs.records import RunFailed
    from fedcsg.runs.report import report_summary

    results = _write_report(out_dir)
    epsilon = ", accuracy_vs_epsilon.png" if results["config"].get("dp", "none") != "none" else ""
    plots = f"accuracy_vs_bytes.png, accuracy_vs_round.png{epsilon}"
    print(f"results in {out_dir}: results.json, results.csv, report.md, {plots}")
    print(report_summary(results))
    line = cpu_clients_line(runs, placement.gpus)
    if line and placement.asked:
        raise RunFailed(line)
    if line:
        print(f"fedcsg: note: {line}", file=sys.stderr)
    return 0


def run_arms(cfg: RunConfig, arms: list[str], out_dir: Path, overwrite: bool = False, verbose: bool = False) -> int:
    """Check, then, holding the directory's lock (:func:`~fedcsg.runs.lock.run_lock`), check again
    (another run may have written meanwhile), clear it if ``overwrite``, and run every arm of every seed."""
    from fedcsg.runs.lock import run_lock

    cfg, placement = _resolved(cfg, arms)
    check_run_dirs(cfg, arms, out_dir, overwrite)
    with run_lock(writable_dir(out_dir)):
        check_run_dirs(cfg, arms, out_dir, overwrite)
        if overwrite:  # everything of an earlier run goes, whatever its seeds
            prepare_out_dir(out_dir, cfg, arms, overwrite=True)
        runs = seed_runs(cfg, out_dir)
        for _, run_dir in runs:
            writable_dir(run_dir)
        planned = [run_cfg.replace(arm=arm, out_dir=str(run_dir)) for run_cfg, run_dir in runs for arm in arms]
        _simulate(planned, out_dir, verbose)
        return _finish(out_dir, planned, placement)


# -- resume -------------------------------------------------------------------------------------


def _check_resume_flags(args: argparse.Namespace) -> Path:
    out_dir = Path(args.resume)
    if args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: pass one of them")
    if args.out and Path(args.out).resolve() != out_dir.resolve():
        raise ValueError(f"--out {args.out!r} is not --resume {args.resume!r}: a run resumes in its own directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"resume directory {str(out_dir)!r} is not a directory: accepted is the --out of an earlier run"
        )
    if not out_dir.is_dir():
        raise FileNotFoundError(f"resume directory {str(out_dir)!r} does not exist")
    return out_dir


def _payload_layout(cfg: RunConfig) -> PayloadLayout:
    """The payload layout of ``cfg``'s arm model, against which its checkpoints are checked."""
    from fedcsg.fl.task import build_arm_model, payload_layout

    return payload_layout(cfg, build_arm_model(cfg))


def _resume_arms(cfg: RunConfig, arms: list[str], out_dir: Path, verbose: bool) -> int:
    """Skip the complete arms, continue the started one, run the missing ones (of every seed);
    everything is validated before anything runs or is written."""
    from fedcsg.runs.lock import run_lock

    cfg, placement = _resolved(cfg, arms)
    with run_lock(out_dir):
        runs = seed_runs(cfg, out_dir)
        progress = [
            {arm: arm_progress(run_dir, run_cfg, arm, _payload_layout) for arm in arms} for run_cfg, run_dir in runs
        ]
        planned = []
        remove_torn_writes(out_dir)  # the report over the seeds (a one-seed run: its own, again below)
        for (run_cfg, run_dir), done_by_arm in zip(runs, progress, strict=True):
            seed = f" (seed {run_cfg.seed})" if cfg.seeds else ""
            remove_torn_writes(run_dir)
            for arm in arms:
                done = done_by_arm[arm]
                if done is not None and done >= cfg.num_rounds:
                    print(f"== arm {arm}{seed}: complete ({cfg.num_rounds} rounds), skipped", flush=True)
                    continue
                if done is not None:
                    print(f"== arm {arm}{seed}: resuming after round {done}", flush=True)
                elif arm_record_path(run_dir, arm).is_file():
                    print(f"== arm {arm}{seed}: stopped before its first checkpoint, starting again", flush=True)
                planned.append(run_cfg.replace(arm=arm, out_dir=str(run_dir)))
        _simulate(planned, out_dir, verbose)
        return _finish(out_dir, planned, placement)


def _default_out(args: argparse.Namespace) -> Path:
    """``--out``, else runs/<experiment name> in the current directory."""
    return Path(args.out) if args.out else default_out(args.config or DEFAULT_EXPERIMENT)


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        out_dir = _check_resume_flags(args)
        cfg = resume_config(out_dir, args.config, _overrides(args))
        held = arms_in(out_dir)
        if not args.arm and len(held) > 1:
            raise ValueError(f"{str(out_dir)!r} holds arms {', '.join(held)}: pass --arm to say which to resume")
        arm = check_arm(args.arm or cfg.arm)
        return _resume_arms(cfg.replace(arm=arm), [arm], out_dir, args.verbose)
    cfg = resolve_config(args)
    arm = check_arm(args.arm or cfg.arm)
    return run_arms(cfg.replace(arm=arm), [arm], _default_out(args), args.overwrite, args.verbose)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.resume:
        out_dir = _check_resume_flags(args)
        cfg = resume_config(out_dir, args.config, _overrides(args))
    else:
        cfg = resolve_config(args)
    arms = [check_arm(a.strip()) for a in args.arms.split(",")] if args.arms else cfg.arm_list
    if not arms:
        raise ValueError("no arms to compare: give --arms fedavg,csg,csg-frozen or set arms in the config")
    cfg = cfg.replace(arms=",".join(arms))  # the records name the arms this compare ran
    if args.resume:
        return _resume_arms(cfg, arms, out_dir, args.verbose)
    return run_arms(cfg, arms, _default_out(args), args.overwrite, args.verbose)


def cmd_configs(args: argparse.Namespace) -> int:
    """List the shipped experiment files, each with the first sentence of its leading comment."""
    for name, path in shipped_experiments().items():
        comments = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comments.append(line.lstrip("#").strip())
        about = " ".join(comments).split(". ")[0].rstrip(".")
        print(f"{name:<30}{about}")
    if args.paths:
        print(f"\n(in {next(iter(shipped_experiments().values())).parent})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedcsg.runs.lock import run_lock
    from fedcsg.runs.report import write_report

    out_dir = Path(args.dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"results directory {str(out_dir)!r} does not exist")
    with run_lock(out_dir):
        write_report(out_dir)
    print((out_dir / REPORT_MD).read_text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``compare``, ``configs`` and ``report`` to the ``fedcsg`` parser's subparsers."""
    for name, handler, help_text in (
        ("run", cmd_run, "run one arm through Flower's simulation engine"),
        ("compare", cmd_compare, "run several arms on the same partitions and seed, then report"),
    ):
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--config",
            help=f"experiment: a TOML file or a shipped name (`fedcsg configs`; default {DEFAULT_EXPERIMENT}; "
            "--resume: the saved one)",
        )
        parser.add_argument("--out", help="output directory (default ./runs/<config name>)")
        parser.add_argument(
            "--seeds",
            metavar="N,N,...",
            help="run every arm once per seed (run setting `seeds`); the report gives mean and std over them",
        )
        parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
        parser.add_argument(
            "--resume",
            metavar="DIR",
            help="continue the run in DIR after its last complete round (complete arms are skipped)",
        )
        parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
        if name == "run":
            parser.add_argument(
                "--arm", help=f"MODEL or MODEL+CODEC, MODEL one of {', '.join(MODELS)} (default: the config's arm)"
            )
        else:
            parser.add_argument("--arms", help="comma-separated arms (default: the config's arms)")
        parser.set_defaults(handler=handler)

    configs = sub.add_parser("configs", help="list the experiment files that ship with fedcsg (--config NAME)")
    configs.add_argument("--paths", action="store_true", help="also print the folder they are in")
    configs.set_defaults(handler=cmd_configs)

    report = sub.add_parser(
        "report", help="rebuild results.json/csv, report.md and plots from DIR/arms (or DIR/seed-N/arms)"
    )
    report.add_argument("dir")
    report.set_defaults(handler=cmd_report)
