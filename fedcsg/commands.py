"""Federated workflows of the command line: bytes, run, compare, report."""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcsg.config import RunConfig, load_experiment
from fedcsg.payload import ARMS, PACKINGS, check_arm

DEFAULT_CONFIG = "configs/quickstart.toml"


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
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


def resolve_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_experiment(args.config)
    overrides = _parse_overrides(args.set or [])
    return RunConfig.from_mapping(overrides, cfg) if overrides else cfg


def prepare_out_dir(out_dir: Path, cfg: RunConfig, arms: list[str], overwrite: bool) -> None:
    """Refuse a directory that already holds results of these arms or of another config, unless
    ``overwrite``; nothing is written before this check passes."""
    arms_dir = out_dir / "arms"
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    existing = sorted(arms_dir.glob("*.json")) if arms_dir.is_dir() else []
    if existing and not overwrite:
        clash = [p.stem for p in existing if p.stem in arms]
        if clash:
            raise FileExistsError(
                f"output directory {str(out_dir)!r} already holds results of {', '.join(clash)}: "
                "pass --overwrite or choose another --out"
            )
        other = json.loads(existing[0].read_text()).get("config", {})
        mine = cfg.to_flower()
        differing = sorted(k for k in mine if k not in ("arm", "out-dir") and other.get(k) != mine[k])
        if differing:
            raise FileExistsError(
                f"output directory {str(out_dir)!r} holds a run with another config ({', '.join(differing[:5])} "
                "differ): pass --overwrite or choose another --out"
            )
    if overwrite:
        for path in existing:
            path.unlink()
        for name in ("results.json", "results.csv", "report.md", "accuracy_vs_bytes.png", "accuracy_vs_round.png"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def check_data(cfg: RunConfig) -> None:
    """Find and read the labels of both splits (cheap), so a bad data path fails before anything runs."""
    from fedcsg.data import load_labels

    for split in ("train", "test"):
        load_labels(cfg.dataset, split, cfg.data_dir or None, hub_name=cfg.hub_name or None)


def _run_arms(cfg: RunConfig, arms: list[str], out_dir: Path, overwrite: bool, verbose: bool) -> int:
    from fedcsg.results import write_report
    from fedcsg.simulation import simulate

    check_data(cfg)
    prepare_out_dir(out_dir, cfg, arms, overwrite)
    for arm in arms:
        print(
            f"== arm {arm}: {cfg.model} on {cfg.dataset}, {cfg.num_clients} clients, {cfg.num_rounds} rounds",
            flush=True,
        )
        simulate(cfg.replace(arm=arm), out_dir, verbose=verbose)
        rounds = json.loads((out_dir / "arms" / f"{arm}.json").read_text())["rounds"]
        if len(rounds) != cfg.num_rounds + 1:
            raise RuntimeError(f"arm {arm!r} recorded {len(rounds) - 1} of {cfg.num_rounds} rounds")
    write_report(out_dir)
    print(f"results in {out_dir}: results.json, results.csv, report.md, accuracy_vs_bytes.png, accuracy_vs_round.png")
    print((out_dir / "report.md").read_text().split("## Test accuracy")[0].strip())
    return 0


def _default_out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("runs") / Path(args.config).stem


def cmd_run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    arm = check_arm(args.arm or cfg.arm)
    return _run_arms(cfg.replace(arm=arm), [arm], _default_out(args), args.overwrite, args.verbose)


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    arms = [check_arm(a.strip()) for a in args.arms.split(",")] if args.arms else cfg.arm_list
    if not arms:
        raise ValueError("no arms to compare: give --arms fedavg,csg,csg-frozen or set arms in the config")
    return _run_arms(cfg, arms, _default_out(args), args.overwrite, args.verbose)


def cmd_report(args: argparse.Namespace) -> int:
    from fedcsg.results import write_report

    out_dir = Path(args.dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"results directory {str(out_dir)!r} does not exist")
    write_report(out_dir)
    print((out_dir / "report.md").read_text())
    return 0


def cmd_bytes(args: argparse.Namespace) -> int:
    from fedcsg.traffic import arm_traffic

    cfg = RunConfig(
        model=args.model,
        slice=args.slice_shape or RunConfig.slice,
        code_dim=args.code_dim or RunConfig.code_dim,
        pointwise_slice=args.pointwise_slice or "",
        dataset="fashion-mnist" if args.model == "fmnist-cnn" else "cifar10",
        payload_packing=args.packing,
        seed=args.seed,
        num_clients=args.clients_per_round,
    )
    rows = [arm_traffic(cfg.replace(arm=arm), args.clients_per_round) for arm in ARMS]
    base = rows[0]
    for row in rows:
        row["upload_ratio_vs_fedavg"] = base["wire_up"] / row["wire_up"]
        row["download_ratio_vs_fedavg"] = base["wire_down"] / row["wire_down"]
        row["payload_upload_ratio_vs_fedavg"] = base["payload_up"] / row["payload_up"]
    if args.json:
        print(
            json.dumps(
                {
                    "model": cfg.model,
                    "slice": cfg.slice,
                    "code_dim": cfg.code_dim,
                    "clients_per_round": args.clients_per_round,
                    "packing": cfg.payload_packing,
                    "arms": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{cfg.model}, slice {cfg.slice} / {cfg.code_dim}, {args.clients_per_round} clients per round, "
        f"{cfg.payload_packing} packing: bytes per round"
    )
    header = ("arm", "tensors", "payload up", "payload down", "wire up", "wire down", "up ratio vs fedavg")
    print("".join(f"{h:>20}" for h in header))
    for row in rows:
        print(
            f"{row['arm']:>20}{row['tensors']:>20,}{row['payload_up']:>20,}{row['payload_down']:>20,}"
            f"{row['wire_up']:>20,}{row['wire_down']:>20,}{row['upload_ratio_vs_fedavg']:>19.2f}x"
        )
    return 0


def register(
    sub: argparse._SubParsersAction,
    add_model_options: Callable[[argparse.ArgumentParser], None],
    positive_int: Callable[[str], int],
) -> None:
    """Add the federated subcommands to the ``fedcsg`` parser."""
    bytes_ = sub.add_parser("bytes", help="bytes per round of each arm, from real Flower messages (no training)")
    add_model_options(bytes_)
    bytes_.add_argument("--clients-per-round", type=positive_int, default=10)
    bytes_.add_argument("--packing", choices=PACKINGS, default="flat", help="payload packing (default: flat)")
    bytes_.add_argument("--seed", type=int, default=0)
    bytes_.set_defaults(handler=cmd_bytes)

    for name, handler, help_text in (
        ("run", cmd_run, "run one arm through Flower's simulation engine"),
        ("compare", cmd_compare, "run several arms on the same partitions and seed, then report"),
    ):
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment TOML (default {DEFAULT_CONFIG})")
        parser.add_argument("--out", help="output directory (default runs/<config name>)")
        parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
        parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
        if name == "run":
            parser.add_argument("--arm", help=f"one of {', '.join(ARMS)} (default: the config's arm)")
        else:
            parser.add_argument("--arms", help="comma-separated arms (default: the config's arms)")
        parser.set_defaults(handler=handler)

    report = sub.add_parser("report", help="rebuild results.json/csv, report.md and plots from DIR/arms")
    report.add_argument("dir")
    report.set_defaults(handler=cmd_report)
