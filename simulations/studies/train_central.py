"""Centralised training of one model, plain vs CSG: test accuracy, filter step and seconds per epoch.

Both arms start from the same seed and see the same data in the same order (the same shuffles and
augmentations, from :class:`fedcsg.data.TensorBatches` seeded with ``--seed``). Each epoch prints
one line per arm (epoch, lr, train loss, train accuracy, test accuracy, the epoch's relative filter
change |W_end - W_start| / |W_start| over every conv layer (generated filters for CSG layers),
training seconds); at the end a table gives, per arm, the parameter count, the final and best test
accuracy, the mean seconds per training epoch (evaluation excluded) and its ratio to the plain arm.
The arms are ``plain``, ``csg`` (trainable generator) and ``csg-frozen`` (the paper's frozen random
binary generator); ``--codes-lr-scale`` / ``--generator-lr-scale`` set the CSG factors' learning
rates as the run settings of the same names do.

By default the arms are interleaved epoch by epoch (plain epoch 1, CSG epoch 1, plain epoch 2,
...), so a change in the machine's load during the run affects both arms alike; training itself
draws no random numbers, so the results are the same as running the arms one after the other
(``--no-interleave``).

The issue's target is a CSG training epoch no more than 5% slower than the plain one (ratio
``<= --max-ratio``, default 1.05); the last line says whether it was met. The exit status is 0
either way: timings are a measurement, not a test.

Usage::

    python3 -m simulations.studies.train_central                         # resnet20, 3 epochs, full CIFAR-10
    python3 -m simulations.studies.train_central --model resnet20 --epochs 2 --json /tmp/train_central_resnet20.json
    python3 -m simulations.studies.train_central --train-limit 2000 --test-limit 1000 --epochs 1 --threads 2
    python3 -m simulations.studies.train_central --arms csg-frozen --slice 16x16x3x3 --code-dim 128
    python3 -m simulations.studies.train_central --arms plain,csg,csg-frozen --epochs 20 --train-limit 10000 \
        --codes-lr-scale 0.1 --json docs/central-codes01.json      # issue 25's central table
    python3 -m simulations.studies.train_central --csg-init paper --train-limit 10000 --epochs 4   # the paper's init
    python3 -m simulations.studies.train_central --dataset fashion-mnist --model fmnist-cnn --lr-schedule step
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcsg.data.batches import TensorBatches
from fedcsg.data.readers import ImageData, load_split
from fedcsg.data.registry import DATASETS
from fedcsg.nn.csg import SliceShape
from fedcsg.nn.csg_factors import factor_lr_scales
from fedcsg.nn.csgify import INITS as CSG_INITS
from fedcsg.nn.models import build_model, default_csg_config, model_spec
from fedcsg.nn.params import count_parameters
from fedcsg.nn.step import conv_filters, relative_change
from fedcsg.nn.training import (
    SCHEDULES,
    evaluate,
    get_device,
    make_optimizer,
    set_seed,
    step_lr,
    train_epoch,
    tune_malloc,
)
from simulations.benchlib import non_negative_int, positive_float, positive_int, write_json

ARM_NAMES: tuple[str, ...] = ("plain", "csg", "csg-frozen")


def parse_arms(text: str) -> list[str]:
    """``"plain,csg"`` -> ``["plain", "csg"]`` (order kept, duplicates refused)."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_NAMES]
    if not arms or unknown:
        raise argparse.ArgumentTypeError(
            f"arms must be a comma-separated subset of {','.join(ARM_NAMES)}, got {text!r}"
        )
    if len(set(arms)) != len(arms):
        raise argparse.ArgumentTypeError(f"arm listed twice in {text!r}")
    return arms


def parse_slice(text: str) -> str:
    try:
        return str(SliceShape.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_model(text: str) -> str:
    try:
        model_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", type=parse_model, default="resnet20", help="registry model")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="cifar10", help="data set")
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs per arm")
    parser.add_argument("--arms", type=parse_arms, default="plain,csg", help="comma-separated arms to run")
    parser.add_argument("--slice", type=parse_slice, default=None, help="CSG slice shape (default: the model's)")
    parser.add_argument(
        "--code-dim", type=positive_int, default=None, help="CSG code dim (default: the model's, or slice numel / 18)"
    )
    parser.add_argument("--codes-lr-scale", type=positive_float, default=1.0, help="CSG codes' lr factor")
    parser.add_argument(
        "--generator-lr-scale", type=positive_float, default=1.0, help="trainable CSG generator's lr factor"
    )
    parser.add_argument(
        "--csg-init",
        choices=CSG_INITS,
        default="kaiming",
        help="CSG init: kaiming-std generated filters, or the paper's",
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    parser.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch size")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="initial learning rate (SGD, momentum 0.9)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument(
        "--lr-schedule", choices=SCHEDULES, default="cosine", help="per-epoch lr schedule over --epochs"
    )
    parser.add_argument("--train-limit", type=non_negative_int, default=0, help="train images (0 = full split)")
    parser.add_argument("--test-limit", type=non_negative_int, default=0, help="test images (0 = full split)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data directory (default: $FEDCSG_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, subsets and data order")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="alternate the arms epoch by epoch (fairer timing on a shared machine)",
    )
    parser.add_argument("--max-ratio", type=positive_float, default=1.05, help="target: CSG / plain seconds per epoch")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    return parser


@dataclass
class Arm:
    """One arm's model, optimiser, data stream and history."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_batches: TensorBatches
    parameters: dict[str, int]
    lr_factors: list[float]  # each param group's lr / the base lr (the CSG factors' lr scales)
    epochs: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        train_seconds = [e["train_seconds"] for e in self.epochs]
        accuracies = [e["test_accuracy"] for e in self.epochs]
        return {
            "parameters": self.parameters["total"],
            "parameter_counts": self.parameters,
            "final_test_accuracy": accuracies[-1],
            "best_test_accuracy": max(accuracies),
            "seconds_per_epoch": sum(train_seconds) / len(train_seconds),
            "seconds_per_epoch_after_first": (
                sum(train_seconds[1:]) / (len(train_seconds) - 1) if len(train_seconds) > 1 else None
            ),
            "epochs": self.epochs,
        }


def make_arm(name: str, args: argparse.Namespace, train: ImageData, device: torch.device) -> Arm:
    """Build one arm from the same seed as every other arm."""
    set_seed(args.seed)
    spec = train.spec
    csg = None
    if name != "plain":
        frozen = name == "csg-frozen"
        csg = default_csg_config(
            args.model, args.slice, args.code_dim, frozen=frozen, seed=args.seed, init=args.csg_init
        )
    model = build_model(args.model, num_classes=spec.num_classes, in_channels=spec.in_channels, csg=csg).to(device)
    scales = factor_lr_scales(model, args.codes_lr_scale, args.generator_lr_scale)
    optimizer = make_optimizer(model, args.lr, momentum=args.momentum, weight_decay=args.weight_decay, lr_scales=scales)
    batches = TensorBatches(train, args.batch_size, shuffle=True, augment=True, seed=args.seed, device=device)
    factors = [group["lr"] / args.lr for group in optimizer.param_groups]
    return Arm(name, model, optimizer, batches, count_parameters(model).as_dict(), factors)


def run_epoch(arm: Arm, epoch: int, args: argparse.Namespace, test: TensorBatches, device: torch.device) -> None:
    """Train ``arm`` for its 0-based ``epoch``, evaluate it, record and print the result."""
    lr = step_lr(args.lr, epoch, args.epochs, args.lr_schedule)
    for group, factor in zip(arm.optimizer.param_groups, arm.lr_factors, strict=True):
        group["lr"] = lr * factor
    before = conv_filters(arm.model)
    stats = train_epoch(arm.model, arm.train_batches, arm.optimizer, device)
    step = relative_change(before, conv_filters(arm.model))
    result = evaluate(arm.model, test, device)
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "filter_change": step.overall,
        "train_seconds": stats.seconds,
        "eval_seconds": result.seconds,
    }
    arm.epochs.append(record)
    print(
        f"{arm.name:>10} epoch {epoch + 1:>3}/{args.epochs}  lr {lr:.4f}  train loss {stats.loss:.4f}  "
        f"train acc {stats.accuracy:.4f}  test acc {result.accuracy:.4f}  step {step.overall:.3f}  "
        f"{stats.seconds:8.1f} s "
        f"(+{result.seconds:.1f} s eval)",
        flush=True,
    )


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    plain = summaries.get("plain")
    header = f"{'arm':<10} | {'parameters':>10} | {'test acc final':>14} | {'test acc best':>13} | "
    header += f"{'s/epoch':>9} | {'ratio to plain':>14}"
    print(header)
    print("-" * len(header))
    for name, s in summaries.items():
        ratio = f"{s['ratio_to_plain']:.3f}" if s["ratio_to_plain"] is not None else "-"
        print(
            f"{name:<10} | {s['parameters']:>10,} | {s['final_test_accuracy']:>14.4f} | "
            f"{s['best_test_accuracy']:>13.4f} | {s['seconds_per_epoch']:>9.2f} | {ratio:>14}"
        )
    if plain is None:
        print("(ratio needs the plain arm)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # as fedcsg's training workers do (fedcsg.nn.training)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    start = time.perf_counter()
    train = load_split(args.dataset, "train", args.data_dir, limit=args.train_limit or None, seed=args.seed)
    test = load_split(args.dataset, "test", args.data_dir, limit=args.test_limit or None, seed=args.seed)
    test_batches = TensorBatches(test, args.eval_batch_size, device=device)
    csg_config = default_csg_config(args.model, args.slice, args.code_dim, seed=args.seed)
    slices = ", ".join(f"{s.shape}/{s.code_dim}" for s in csg_config.slices)
    print(
        f"{args.model} on {args.dataset}: {len(train)} train / {len(test)} test images, {args.epochs} epoch(s), "
        f"batch {args.batch_size}, lr {args.lr} ({args.lr_schedule}), seed {args.seed}, device {device}, "
        f"{torch.get_num_threads()} thread(s); CSG slices {slices}"
        f", {args.csg_init} init, codes lr x{args.codes_lr_scale:g}, generator lr x{args.generator_lr_scale:g}; "
        f"data loaded in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    arms = [make_arm(name, args, train, device) for name in args.arms]
    if args.interleave:
        for epoch in range(args.epochs):
            for arm in arms:
                run_epoch(arm, epoch, args, test_batches, device)
    else:
        for arm in arms:
            for epoch in range(args.epochs):
                run_epoch(arm, epoch, args, test_batches, device)

    summaries = {arm.name: arm.summary() for arm in arms}
    plain_seconds = summaries["plain"]["seconds_per_epoch"] if "plain" in summaries else None
    for summary in summaries.values():
        summary["ratio_to_plain"] = summary["seconds_per_epoch"] / plain_seconds if plain_seconds else None
    print()
    print_table(summaries)
    csg_ratio = summaries.get("csg", {}).get("ratio_to_plain")
    target_met = None if csg_ratio is None else bool(csg_ratio <= args.max_ratio)
    if target_met is not None:
        verdict = "PASS" if target_met else "FAIL"
        print(f"target CSG / plain seconds per epoch <= {args.max_ratio:g}: {verdict} ({csg_ratio:.3f})")

    if args.json is not None:
        report = {
            "benchmark": "train_central",
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "csg_slices": [{"slice": str(s.shape), "code_dim": s.code_dim} for s in csg_config.slices],
            "train_images": len(train),
            "test_images": len(test),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "target_met": target_met,
            "seconds": time.perf_counter() - start,
            "arms": summaries,
        }
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
