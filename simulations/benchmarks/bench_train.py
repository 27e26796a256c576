"""Images per second of one local training step, per arm and execution setting: the table behind the
``compile``, ``channels-last`` and ``precision`` defaults (docs/performance.md).

For every arm's model (fedavg = plain, csg, csg-frozen, fedpara) and every variant (eager, channels
last, compiled, compiled channels last) x precision (fp32, and bf16 / fp16 where the device runs
them) it times SGD-momentum train steps at a fixed batch on random data of ``--dataset``'s shape: the first
step (the compile warm-up for a compiled variant), then the mean of ``--steps`` steps after
``--warmup`` more. GFLOP/s counts the trained image's FLOPs (forward and backward of the plain
model, by torch's FLOP counter, generation not counted) and is set beside ``--peak-gflops`` and
the machine's measured fp32 matmul rate.

    python3 -m simulations.benchmarks.bench_train --threads 2 --out docs/bench/train-cpu.json
    python3 -m simulations.benchmarks.bench_train --device cuda --batch-size 512      # on a GPU machine

Each cell runs in a fresh process (torch.compile's caches and the allocator start clean; the
inductor's on-disk cache is kept, as on a real machine), so cells do not disturb each other. With
``--repeat N`` every cell runs N times, interleaved with the others, and its best round is kept (a
busy machine only slows a round down); the first round's first step is the cold compile.
Needs torch and fedcsg from the checkout only (no flwr or ray).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("fedavg", "csg", "csg-frozen", "fedpara")
VARIANTS = {  # name: (compile, channels_last)
    "eager": (False, False),
    "channels-last": (False, True),
    "compile": (True, False),
    "compile+channels-last": (True, True),
}
PRECISIONS = ("fp32", "bf16", "fp16")


def measure_cell(args: argparse.Namespace) -> dict:
    """One (arm, variant, precision) cell, in this process."""
    import torch
    import torch.nn.functional as F

    from fedcsg.data.registry import get_spec
    from fedcsg.nn.execution import Execution, precision_problem
    from fedcsg.nn.training import backward_and_step, make_optimizer
    from fedcsg.spec.config import RunConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if problem := precision_problem(args.precision, device):
        return {"skipped": problem}
    torch.manual_seed(0)
    compile_, channels_last = VARIANTS[args.variant]
    execution = Execution(compile=compile_, channels_last=channels_last, precision=args.precision)
    cfg = RunConfig(model=args.model, arm=args.arm, slice=args.slice, code_dim=args.code_dim, dataset=args.dataset)
    spec = get_spec(args.dataset)
    model = execution.place(cfg.model_settings().build(), device)
    compiled = execution.compiled(model, device)
    forward = model if compiled is None else compiled
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
    scaler = execution.grad_scaler(device)
    x = execution.batch(torch.randn(args.batch_size, spec.in_channels, *spec.image_size, device=device))
    y = torch.randint(0, spec.num_classes, (args.batch_size,), device=device)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with execution.autocast(device):
            loss = F.cross_entropy(forward(x), y)
        backward_and_step(loss, optimizer, scaler)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed(1)
    timed(args.warmup)
    seconds = timed(args.steps) / args.steps
    return {"first_step_s": round(first, 3), "step_s": seconds, "images_per_s": args.batch_size / seconds}


def flops_per_image(model_name: str, dataset: str) -> float:
    """FLOPs of training one image (forward + backward) of the plain model, by torch's counter."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from fedcsg.data.registry import get_spec
    from fedcsg.spec.config import RunConfig

    spec = get_spec(dataset)
    model = RunConfig(model=model_name, arm="fedavg", dataset=dataset).model_settings().build()
    x, y = torch.randn(8, spec.in_channels, *spec.image_size), torch.randint(0, spec.num_classes, (8,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 8


def matmul_gflops(threads: int, device: str) -> float:
    """The device's measured fp32 matmul rate (2048^3), a practical peak."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="cifar10", help="the input's shape and classes (random data)")
    parser.add_argument("--slice", default="12x12x3x3")
    parser.add_argument("--code-dim", type=int, default=72)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over all cells, interleaved; a cell's best round is kept"
    )
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="the device's stated fp32 peak (0: not given)")
    parser.add_argument("--out", default="", help="JSON file to write")
    # one cell, in a child process
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, values, accepted in (
        ("arms", args.arms, ARMS),
        ("variants", args.variants, tuple(VARIANTS)),
        ("precisions", args.precisions, PRECISIONS),
    ):
        if bad := [v for v in values.split(",") if v not in accepted]:
            message = f"bench_train.py: --{name} {','.join(bad)!r} is not accepted: any of {', '.join(accepted)}\n"
            parser.exit(2, message)
    return args


def child_command(args: argparse.Namespace, arm: str, variant: str, precision: str) -> list[str]:
    keep = ("model", "dataset", "slice", "code_dim", "device", "threads", "batch_size", "warmup", "steps")
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keep]
    return [
        sys.executable,
        "-m",
        __spec__.name,
        *flags,
        f"--arm={arm}",
        f"--variant={variant}",
        f"--precision={precision}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arm:  # a child: one cell, JSON on the last line
        print(json.dumps(measure_cell(args)))
        return 0
    flops = flops_per_image(args.model, args.dataset)
    matmul = matmul_gflops(args.threads, args.device)
    order = [
        (p, a, v) for p in args.precisions.split(",") for a in args.arms.split(",") for v in args.variants.split(",")
    ]
    runs: dict[tuple[str, str, str], list[dict]] = {key: [] for key in order}
    for _ in range(args.repeat):  # interleaved, so that a disturbance of the machine hits one round
        for precision, arm, variant in order:
            done = subprocess.run(
                child_command(args, arm, variant, precision), capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                runs[(precision, arm, variant)].append({"error": tail[0]})
            else:
                runs[(precision, arm, variant)].append(json.loads(done.stdout.strip().splitlines()[-1]))
    cells = []
    for (precision, arm, variant), results in runs.items():
        timed = [r for r in results if "images_per_s" in r]
        result = max(timed, key=lambda r: r["images_per_s"]) if timed else results[0]
        cell = {"arm": arm, "variant": variant, "precision": precision, **result}
        if timed:
            cell["gflops"] = result["images_per_s"] * flops / 1e9
            cell["images_per_s_rounds"] = [round(r["images_per_s"], 1) for r in timed]
            cell["first_step_s"] = results[0]["first_step_s"]  # the first round's: a cold compile cache
        cells.append(cell)
        print(_row(cell, args.peak_gflops, matmul), flush=True)
    document = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "model": args.model,
        "dataset": args.dataset,
        "slice": args.slice,
        "code_dim": args.code_dim,
        "gflop_per_trained_image": flops / 1e9,
        "matmul_gflops": matmul,
        "peak_gflops": args.peak_gflops or None,
        "cells": cells,
    }
    print(f"\ntrained image: {flops / 1e9:.3f} GFLOP; fp32 matmul 2048^3: {matmul:.0f} GFLOP/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    return 0 if any("images_per_s" in c for c in cells) else 1


def _row(cell: dict, peak: float, matmul: float) -> str:
    head = f"{cell['precision']:5} {cell['arm']:11} {cell['variant']:22}"
    if "images_per_s" not in cell:
        return f"{head} {cell.get('skipped') or cell.get('error')}"
    share = f" {100 * cell['gflops'] / peak:5.1f}% of peak" if peak else ""
    of_matmul = 100 * cell["gflops"] / matmul
    return (
        f"{head} {cell['images_per_s']:8.0f} img/s  {cell['gflops']:6.1f} GFLOP/s ({of_matmul:5.1f}% of matmul)"
        f"{share}  first step {cell['first_step_s']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
