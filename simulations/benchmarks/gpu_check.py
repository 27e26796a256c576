"""The GPU check: one prepared script for a machine with one GPU (at most 8 minutes), docs/gpu.md.

(a)-(c) need torch alone, with fedcsg imported from this checkout (no flwr, no ray):

(a) each arm kind through a client's local training on the device: every parameter and buffer on
    the device while it trains, the frozen generator equal to its CPU build, finite losses, the
    device's allocated memory flat over 3 rounds on one client's model;
(b) one epoch's loss on the CPU against the device (the TF32 gap), and two device runs with
    ``deterministic`` equal;
(c) train images/s per arm on the device (channels-last), for each precision of :data:`PRECISIONS` the
    device runs, eager and (:data:`COMPILED_ARMS`, not at the tiny size) compiled;
(d) when flwr and ray import and the device is CUDA: ``fedcsg run`` of csg with client-num-gpus auto
    (4 clients on one GPU) for each of :data:`FEDERATED_VARIANTS`, the records saying every client
    trained on CUDA, seconds a round and images/s per GPU.

Writes ``gpu_check.json`` and ``gpu_check.md`` (a table) to ``--out``. The test suite runs it with
``--tiny --device cpu``, so that it cannot rot::

    python3 -m simulations.benchmarks.gpu_check --out gpu-check
    python3 -m simulations.benchmarks.gpu_check --tiny --device cpu --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedcsg.data.batches import TensorBatches, data_on
from fedcsg.data.readers import ImageData, load_split
from fedcsg.nn.determinism import set_deterministic
from fedcsg.nn.devices import describe
from fedcsg.nn.execution import FP32_EAGER, PRECISIONS, Execution, precision_problem
from fedcsg.nn.training import get_device, make_optimizer, train_epoch
from fedcsg.spec.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]  # the fedcsg checkout (the device machine runs it uninstalled)
ARMS = ("fedavg", "csg", "csg-frozen", "fedpara", "csg+int8/delta-int8")  # a codec changes no model
COMPILED_ARMS = ("fedavg", "csg")  # (c) times these compiled too (a CUDA graph per step: reduce-overhead)
# (d): the federated run's (precision, compile) settings, 4 clients sharing the GPU
FEDERATED_VARIANTS = (("fp32", "off"), ("fp32", "on"), ("bf16", "off"), ("bf16", "on"))


@dataclass(frozen=True)
class Size:
    """What the check trains: model, data, batch, rounds for (a), batches timed in (c)."""

    model: str
    dataset: str
    images: int
    batch: int
    rounds: int
    timed_epochs: int


SIZES = {
    "full": Size("resnet20", "cifar10", 2048, 128, 3, 2),
    "tiny": Size("fmnist-cnn", "fashion-mnist", 64, 32, 3, 1),
}


def build(size: Size, arm: str) -> nn.Module:
    return ModelSettings(model=size.model, arm=arm, dataset=size.dataset).build()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that do not train (csg-frozen's generator), on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if not p.requires_grad}


def off_device(model: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers not on ``device``'s type."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.device.type != device.type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch(
    model: nn.Module,
    data: ImageData,
    size: Size,
    device: torch.device,
    seed: int,
    execution: Execution = FP32_EAGER,
    compiled: nn.Module | None = None,
) -> float:
    """One local epoch with a fresh optimizer (a client's round); its mean loss."""
    batches = TensorBatches(data, size.batch, shuffle=True, augment=True, seed=seed, device=device)
    optimizer = make_optimizer(model, 0.05)
    return train_epoch(model, batches, optimizer, device, execution, compiled).loss


def check_arm(arm: str, size: Size, data: ImageData, device: torch.device) -> dict:
    """(a): one client's model through ``size.rounds`` rounds on ``device``."""
    cpu_build = build(size, arm)
    model = build(size, arm).to(device)
    on_device = data_on(data, device)
    generator_equal = all(
        torch.equal(a, b) for a, b in zip(frozen_state(cpu_build).values(), frozen_state(model).values(), strict=True)
    )
    losses, memory, stray = [], [], []
    for round_ in range(size.rounds):
        losses.append(one_epoch(model, on_device, size, device, seed=round_))
        stray += off_device(model, device)
        sync(device)
        memory.append(torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
    flat = memory[-1] == memory[1] if device.type == "cuda" and len(memory) > 2 else None
    return {
        "arm": arm,
        "all_on_device": not stray,
        "off_device": sorted(set(stray))[:5],
        "frozen_generator_equal_to_cpu_build": generator_equal,
        "frozen_parameters": len(frozen_state(cpu_build)),
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "allocated_bytes_per_round": memory,
        "memory_flat": flat,
        "ok": not stray and generator_equal and all(math.isfinite(x) for x in losses) and flat is not False,
    }


def reproducibility(size: Size, data: ImageData, device: torch.device) -> dict:
    """(b): one epoch of csg from one state on the CPU and on ``device``; twice on ``device`` with
    ``deterministic``."""

    def run(where: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
        model = build(size, "csg").to(where)
        loss = one_epoch(model, data_on(data, where), size, where, seed=0)
        return loss, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    cpu_loss, _ = run(torch.device("cpu"))
    device_loss, _ = run(device)
    set_deterministic(True)
    try:
        first, second = run(device), run(device)
    finally:
        set_deterministic(False)
    equal = first[0] == second[0] and all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    return {
        "cpu_loss": cpu_loss,
        "device_loss": device_loss,
        "cpu_device_gap": abs(cpu_loss - device_loss),
        "deterministic_losses": [first[0], second[0]],
        "deterministic_equal": equal,
        "ok": equal,
    }


def throughput(arm: str, precision: str, compile_: bool, size: Size, data: ImageData, device: torch.device) -> dict:
    """(c): train images/s of ``arm`` at ``precision``, eager or compiled, channels-last (one untimed
    warm-up epoch first: the compile's); skipped where the device lacks the precision."""
    cell = {"arm": arm, "precision": precision, "compiled": compile_}
    if problem := precision_problem(precision, device):
        return {**cell, "skipped": problem}
    execution = Execution(compile=compile_, channels_last=True, precision=precision)
    model = execution.place(build(size, arm), device)
    compiled = execution.compiled(model, device)
    on_device = data_on(data, device)
    one_epoch(model, on_device, size, device, 0, execution, compiled)
    sync(device)
    start = time.perf_counter()
    for epoch in range(size.timed_epochs):
        one_epoch(model, on_device, size, device, 1 + epoch, execution, compiled)
    sync(device)
    seconds = time.perf_counter() - start
    return {**cell, "images_per_s": size.timed_epochs * len(data) / seconds}


def federated_runs(device: torch.device, data_dir: str) -> list[dict]:
    """(d) for each of :data:`FEDERATED_VARIANTS`."""
    return [federated_run(device, data_dir, precision, compile_) for precision, compile_ in FEDERATED_VARIANTS]


def federated_run(device: torch.device, data_dir: str, precision: str = "fp32", compile_: str = "off") -> dict:
    """(d): `fedcsg run` of csg, ResNet-20 on CIFAR-10, client-num-gpus auto and 4 clients, where flwr and
    ray import and the device is CUDA; else why it was skipped. Images/s per GPU: the round's 8,000
    training images over the round's seconds (rounds 2 and 3: after the compile)."""
    missing = [name for name in ("flwr", "ray") if importlib.util.find_spec(name) is None]
    # (d) is `fedcsg run` in a process of its own: flwr and ray are never imported here.
    if missing or device.type != "cuda":
        skipped = f"needs {', '.join(missing)}" if missing else "needs a CUDA device"
        return {"precision": precision, "compile": compile_, "skipped": skipped, "ok": None}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp) / "run"
        # ResNet-20 on CIFAR-10 (the data such a machine is given); 4 clients at once on the GPU: with the
        # server on it too, clients-per-gpu = 5 gives each client 1/4 (fedcsg.spec.resources).
        sets = ["model='resnet20'", "dataset='cifar10'", "slice='12x12x3x3'", "code-dim=72", "num-clients=4"]
        sets += ["num-rounds=3", "train-limit=8000", "test-limit=2000", "client-num-gpus='auto'", "clients-per-gpu=5"]
        sets += [f"precision='{precision}'", f"compile='{compile_}'"]
        command = [sys.executable, "-m", "fedcsg.cli", "run", "--arm", "csg", "--out", str(out)]
        command += [item for pair in sets for item in ("--set", pair)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **({"FEDCSG_DATA_DIR": data_dir} if data_dir else {})}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        if done.returncode != 0:
            return {
                "precision": precision,
                "compile": compile_,
                "returncode": done.returncode,
                "ok": False,
                "stderr": done.stderr[-2000:],
            }
        record = json.loads((out / "arms" / "csg.json").read_text())
    rounds = [r for r in record["rounds"] if r["round"] > 0]
    devices = [d for r in rounds for d in r.get("devices") or []]
    return {
        "precision": precision,
        "compile": compile_,
        "images_per_s_per_gpu": [8000 / r["seconds"] for r in rounds[1:]],
        "client_num_gpus": record["config"]["client-num-gpus"],
        "server_device": record["server_device"],
        "devices": sorted(set(devices)),
        "all_clients_on_cuda": bool(devices) and all(d.startswith("cuda") for d in devices),
        "seconds_per_round": [r["seconds"] for r in rounds],
        "ok": bool(devices) and all(d.startswith("cuda") for d in devices),
    }


def table(results: dict) -> str:
    """The markdown table of a check's results."""
    lines = [
        f"GPU check on {results['device']} (torch {results['torch']}, size {results['size']}).",
        "",
        "| arm | on device | frozen = CPU build | finite losses | memory flat | "
        + " | ".join(f"img/s {p}" for p in PRECISIONS)
        + " | "
        + " | ".join(f"img/s {p} compiled" for p in PRECISIONS)
        + " |",
        "| --- | --- | --- | --- | --- |" + " ---: |" * 2 * len(PRECISIONS),
    ]
    speed = {(r["arm"], r["precision"], r["compiled"]): r.get("images_per_s") for r in results["throughput"]}

    def shown(key: tuple) -> str:
        return "-" if speed.get(key) is None else f"{speed[key]:.0f}"

    for a in results["arms"]:
        cells = [str(a["all_on_device"]), str(a["frozen_generator_equal_to_cpu_build"]), str(a["finite"])]
        cells.append("n/a (CPU)" if a["memory_flat"] is None else str(a["memory_flat"]))
        cells += [shown((a["arm"], p, c)) for c in (False, True) for p in PRECISIONS]
        lines.append(f"| {a['arm']} | " + " | ".join(cells) + " |")
    b = results["reproducibility"]
    lines += [
        "",
        f"One epoch of csg: loss {b['cpu_loss']:.6f} on the CPU, {b['device_loss']:.6f} on the device "
        f"(gap {b['cpu_device_gap']:.2e}); two runs with deterministic: equal = {b['deterministic_equal']}.",
        "",
        "Federated runs (d), csg, 4 clients sharing the GPU:",
        *(f"- {json.dumps(run)}" for run in results["federated"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--tiny", action="store_true", help="the suite's size: the small CNN on 64 Fashion-MNIST images"
    )
    parser.add_argument("--data-dir", default=os.environ.get("FEDCSG_DATA_DIR", ""))
    parser.add_argument("--out", default="gpu-check")
    args = parser.parse_args(argv)
    device = get_device(args.device)
    size = SIZES["tiny" if args.tiny else "full"]
    data = load_split(size.dataset, "train", args.data_dir or None, limit=size.images)
    results = {
        "device": describe(device),
        "torch": torch.__version__,
        "size": "tiny" if args.tiny else "full",
        "precisions": list(PRECISIONS),
        "arms": [check_arm(arm, size, data, device) for arm in ARMS],
        "reproducibility": reproducibility(size, data, device),
        "throughput": [
            throughput(arm, p, c, size, data, device)
            for arm in ARMS
            for c in ((False, True) if arm in COMPILED_ARMS and not args.tiny else (False,))
            for p in PRECISIONS
        ],
        "federated": federated_runs(device, args.data_dir),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(results))
    print(table(results), end="")
    checks = [a["ok"] for a in results["arms"]] + [results["reproducibility"]["ok"]]
    checks += [run["ok"] for run in results["federated"]]
    return 0 if all(ok is not False for ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
