"""Compute cost of generating the filters: a CSG model's training step and evaluation pass vs the plain model's.

For each model the plain network and its CSG form (the registry's default slice setting, or
``--slice``/``--code-dim``) are timed on the same synthetic CIFAR-shaped batch:

* train step: ``zero_grad``, forward, cross-entropy, backward and an SGD step (momentum and weight
  decay as in :class:`fedcsg.spec.config.RunConfig`), batch ``--train-batch``;
* evaluation pass: ``model.eval()`` and ``torch.no_grad()`` over ``--eval-batches`` batches of
  ``--eval-batch`` images. The CSG model's generated-weight cache is cleared before every pass, as
  after loading a new global model, so each pass pays one generation (the worst case for one batch);
* generation alone: one call of every generator for all its layers, forward and backward (what a
  CSG train step adds to the plain one besides the smaller optimizer step).

Plain and CSG measurements are interleaved (ABAB..., the order alternating per repeat) and the
median is taken, so drift on a shared machine affects both alike; the ratio is median(CSG) /
median(plain), with the median of the per-pair ratios and the ratio of the minima alongside. Each
sample records wall-clock and process CPU time; ``--clock`` picks the one that decides the targets
(wall by default). On a CPU machine shared with other jobs, ``--threads 1 --clock cpu`` is far
steadier: time stolen by other processes is not counted.

Targets (PASS/FAIL): train step <= ``--train-target`` x plain (1.05), eval <= ``--eval-target``
x plain (1.02). ``--profile N`` prints torch.profiler's top N ops of one train step of each.

Usage::

    python3 -m simulations.benchmarks.bench_generation
    python3 -m simulations.benchmarks.bench_generation --threads 1 --clock cpu --repeats 40
    python3 -m simulations.benchmarks.bench_generation --device cuda --train-batch 128 --eval-batch 1024 --repeats 100
    python3 -m simulations.benchmarks.bench_generation --models resnet56 --profile 15

Exit status: 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedcsg.nn.csg import clear_generated_cache, csg_layers, generators
from fedcsg.nn.models import build_model, default_csg_config
from fedcsg.nn.params import count_parameters
from fedcsg.nn.training import get_device, make_optimizer, tune_malloc
from fedcsg.spec.config import RunConfig
from simulations.benchlib import RESULTS, cpu_name, parse_models, positive_int, write_json

CLOCKS = ("wall", "cpu")  # what a sample records: wall-clock and process CPU seconds


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", type=parse_models, default="resnet20,resnet56", help="comma-separated models")
    parser.add_argument("--slice", default=None, help="slice shape OUTxINxKxK (default: the model's registry setting)")
    parser.add_argument("--code-dim", type=positive_int, default=None, help="code dim (default: the model's)")
    parser.add_argument("--train-batch", type=positive_int, default=64, help="train step batch size")
    parser.add_argument("--eval-batch", type=positive_int, default=256, help="evaluation batch size")
    parser.add_argument(
        "--eval-batches",
        type=positive_int,
        default=8,
        help="batches per evaluation pass; the cache is cleared at the start of each pass, so a pass pays one "
        "generation, as evaluating a test set after a round does",
    )
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed train steps per model and variant")
    parser.add_argument(
        "--eval-repeats", type=positive_int, default=None, help="timed evaluation passes (default: repeats // 2)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps/passes first")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="clock that decides the targets: wall time, or this process's CPU time (steadier on a shared CPU "
        "machine with --threads 1; both are recorded)",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-target", type=float, default=1.05, help="max CSG/plain train step time")
    parser.add_argument("--eval-target", type=float, default=1.02, help="max CSG/plain evaluation pass time")
    parser.add_argument("--profile", type=int, default=0, help="print the top N profiler ops of one train step")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults instead of fedcsg.nn.training.tune_malloc() (as fedcsg's workers use)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "bench_generation.json",
        help="JSON output",
    )
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Wall-clock and process CPU seconds of ``fn()`` (CPU time: every thread of this process)."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


class Variant:
    """One model (plain or CSG) with its optimizer and its three timed operations."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, device: torch.device) -> None:
        self.name = name
        self.model = model.to(device)
        self.device = device
        self.optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay)
        self.csg = bool(generators(model))
        self.layers = [layer for _, layer in csg_layers(model)]
        # Upstream gradients of the generated weights for the generation-only timing.
        self.weight_grads = [torch.randn(layer.weight.shape, device=device) for layer in self.layers]
        self.times = {kind: {clock: [] for clock in CLOCKS} for kind in ("train", "eval", "generation")}

    def record(self, kind: str, seconds: dict[str, float]) -> None:
        for clock in CLOCKS:
            self.times[kind][clock].append(seconds[clock])

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()

    def eval_pass(self, batches: list[torch.Tensor]) -> None:
        self.model.eval()
        clear_generated_cache(self.model)
        with torch.no_grad():
            for x in batches:
                self.model(x)

    def generation(self) -> None:
        """Every generator once for all its layers (forward), then backward into codes and generator."""
        weights = [layer.weight for layer in self.layers]
        torch.autograd.backward(weights, self.weight_grads)
        for param in self.model.parameters():
            param.grad = None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(plain: list[float], csg: list[float]) -> dict:
    """Medians, their ratio, the median of per-repeat ratios and the ratio of the minima."""
    plain_med, csg_med = median(plain), median(csg)
    return {
        "plain_median_s": plain_med,
        "csg_median_s": csg_med,
        "ratio": csg_med / plain_med,
        "paired_ratio_median": median([c / p for p, c in zip(plain, csg, strict=True)]),
        "min_ratio": min(csg) / min(plain),
        "plain_s": plain,
        "csg_s": csg,
    }


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    csg_config = default_csg_config(name, args.slice, args.code_dim, seed=args.seed)
    torch.manual_seed(args.seed)
    plain = Variant("plain", build_model(name), args, device)
    torch.manual_seed(args.seed)
    csg = Variant("csg", build_model(name, csg=csg_config), args, device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.train_batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.train_batch,), generator=gen).to(device)
    eval_x = [torch.randn(args.eval_batch, 3, 32, 32, generator=gen).to(device) for _ in range(args.eval_batches)]
    eval_repeats = args.eval_repeats or max(1, args.repeats // 2)

    def pairs(count: int) -> list[tuple[Variant, Variant]]:
        return [(plain, csg) if i % 2 == 0 else (csg, plain) for i in range(count)]

    # Train steps (and, for the CSG model, the generation alone right after its step).
    for i, order in enumerate(pairs(args.warmup + args.repeats)):
        for variant in order:
            seconds = _timed(lambda v=variant: v.train_step(x, y), device)
            if i >= args.warmup:
                variant.record("train", seconds)
        seconds = _timed(csg.generation, device)
        if i >= args.warmup:
            csg.record("generation", seconds)
    # Evaluation passes.
    for i, order in enumerate(pairs(args.warmup + eval_repeats)):
        for variant in order:
            seconds = _timed(lambda v=variant: v.eval_pass(eval_x), device)
            if i >= args.warmup:
                variant.record("eval", seconds)

    result: dict = {
        "model": name,
        "slices": [f"{s.shape}/{s.code_dim}" for s in csg_config.slices],
        "parameters": {"plain": count_parameters(plain.model).total, "csg": count_parameters(csg.model).total},
        "csg_layers": len(csg.layers),
    }
    for kind, target in (("train", args.train_target), ("eval", args.eval_target)):
        by_clock = {clock: summarize(plain.times[kind][clock], csg.times[kind][clock]) for clock in CLOCKS}
        result[kind] = {
            "clock": args.clock,
            **by_clock[args.clock],
            "target": target,
            "pass": bool(by_clock[args.clock]["ratio"] <= target),
            "by_clock": by_clock,
        }
    gen = {clock: median(csg.times["generation"][clock]) for clock in CLOCKS}
    result["generation"] = {
        "clock": args.clock,
        "median_s": gen[args.clock],
        "fraction_of_plain_train_step": gen[args.clock] / result["train"]["plain_median_s"],
        "by_clock": {
            clock: {
                "median_s": gen[clock],
                "fraction_of_plain_train_step": gen[clock] / result["train"]["by_clock"][clock]["plain_median_s"],
                "samples_s": csg.times["generation"][clock],
            }
            for clock in CLOCKS
        },
    }
    if args.profile > 0:
        result["profile"] = {v.name: profile_step(v, x, y, args.profile) for v in (plain, csg)}
    return result


def profile_step(variant: Variant, x: torch.Tensor, y: torch.Tensor, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device.type == "cuda" else [])
    variant.train_step(x, y)
    with profile(activities=activities) as prof:
        variant.train_step(x, y)
        _sync(variant.device)
    sort = "cuda_time_total" if variant.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=top)
    print(f"\n-- profile: one train step of {variant.name}\n{table}")
    return table


def print_table(rows: list[dict], clock: str) -> None:
    print(f"medians of {'wall-clock' if clock == 'wall' else 'process CPU'} time")
    header = f"{'model':>10}{'variant':>9}{'params':>11}{'train ms':>11}{'eval ms':>10}{'gen ms':>9}{'gen/step':>10}"
    print(header)
    for row in rows:
        for variant in ("plain", "csg"):
            gen = row["generation"] if variant == "csg" else None
            print(
                f"{row['model']:>10}{variant:>9}{row['parameters'][variant]:>11,}"
                f"{1e3 * row['train'][f'{variant}_median_s']:>11.2f}{1e3 * row['eval'][f'{variant}_median_s']:>10.2f}"
                + (
                    f"{1e3 * gen['median_s']:>9.2f}{100 * gen['fraction_of_plain_train_step']:>9.1f}%"
                    if gen
                    else f"{'-':>9}{'-':>10}"
                )
            )
    print()
    print(
        f"{'model':>10}{'train x':>9}{'paired':>8}{'min':>8}{'target':>8}{'':>6}{'eval x':>9}{'paired':>8}{'min':>8}"
        f"{'target':>8}{'':>6}{'overhead ms':>13}{'gen ms':>9}"
    )
    for row in rows:
        train, evaluation = row["train"], row["eval"]
        overhead = 1e3 * (train["csg_median_s"] - train["plain_median_s"])
        print(
            f"{row['model']:>10}{train['ratio']:>8.3f}x{train['paired_ratio_median']:>7.3f}x{train['min_ratio']:>7.3f}x"
            f"{train['target']:>7.2f}x{'PASS' if train['pass'] else 'FAIL':>6}"
            f"{evaluation['ratio']:>8.3f}x{evaluation['paired_ratio_median']:>7.3f}x{evaluation['min_ratio']:>7.3f}x"
            f"{evaluation['target']:>7.2f}x{'PASS' if evaluation['pass'] else 'FAIL':>6}"
            f"{overhead:>13.2f}{1e3 * row['generation']['median_s']:>9.2f}"
        )
    print(
        "x = median(CSG) / median(plain) (decides the target); paired = median of per-repeat CSG/plain ratios; "
        "min = min(CSG) / min(plain);\noverhead = CSG - plain train step (median); gen = one generation of all "
        "layers, forward + backward (median)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    device = get_device(args.device)
    malloc_tuned = False if args.default_malloc else tune_malloc()
    print(f"malloc tuned (fedcsg.nn.training.tune_malloc): {malloc_tuned}")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    eval_repeats = args.eval_repeats or max(1, args.repeats // 2)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; train batch "
        f"{args.train_batch} x {args.repeats} steps, eval {args.eval_batches} x {args.eval_batch} images x "
        f"{eval_repeats} passes, warmup {args.warmup}; clock {args.clock}",
        flush=True,
    )
    start = time.perf_counter()
    rows = []
    for name in args.models:
        began = time.perf_counter()
        rows.append(bench_model(name, args, device))
        print(f"  {name}: measured in {time.perf_counter() - began:.0f} s", flush=True)
    print_table(rows, args.clock)
    all_pass = all(row["train"]["pass"] and row["eval"]["pass"] for row in rows)
    print(f"targets (train <= {args.train_target:g}x, eval <= {args.eval_target:g}x): {'PASS' if all_pass else 'FAIL'}")
    report = {
        "benchmark": "generation",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {
            "train_batch": args.train_batch,
            "eval_batch": args.eval_batch,
            "eval_batches": args.eval_batches,
            "repeats": args.repeats,
            "eval_repeats": eval_repeats,
            "warmup": args.warmup,
            "lr": args.lr,
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "clock": args.clock,
        },
        "all_pass": all_pass,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_json(args.json, report)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
