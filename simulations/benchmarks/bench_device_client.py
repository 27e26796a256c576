"""What a device owner plans with: the fedcsg ClientApp's peak memory and seconds per local epoch on
one CPU thread.

Each measurement is a fresh process, as on a SuperNode (which starts a new ClientApp process for every
message): it is pinned to one core (``taskset -c CORE``), runs with ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``, imports the ClientApp, and calls its ``train`` handler with a real
Flower train message (the arm's initial global payload) and a SuperNode's node config
(``partition-id``, ``num-partitions``, ``data-dir``). The handler decodes its partition, loads the
payload, trains ``local-epochs`` epochs and builds the reply, exactly as on a device. Reported:

``epoch s``
    the handler's own ``train-seconds`` metric, per epoch (training only);
``data s``
    decoding the client's partition (through the ClientApp's own cache, before the handler runs);
``handler s``
    the rest of the handler call: model build, payload load, training, reply;
``start s``
    interpreter start and imports (Python, torch, flwr, fedcsg) before the handler runs;
``peak MiB``, ``imports MiB``, ``+data MiB``
    the process's high-water resident memory (``VmHWM``); the resident memory after the imports; what
    decoding the partition added (including the data libraries it imports).

With 10 partitions of CIFAR-10's 50,000 training images, a client holds 5,000 images.

Usage::

    FEDCSG_DATA_DIR=/work/shared/data python3 -m simulations.benchmarks.bench_device_client
    python3 -m simulations.benchmarks.bench_device_client --arms csg --num-partitions 50 --epochs 1

Writes ``simulations/results/bench_device_client.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from simulations.benchlib import RESULTS, cpu_name, write_json


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """One ClientApp train call in this process; prints one JSON line."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from flwr.app import Context, RecordDict

    from fedcsg.fl.client_app import train
    from fedcsg.fl.traffic import round_messages
    from fedcsg.spec.config import RunConfig

    imported = time.perf_counter()
    rss_after_import = _status_kib("VmRSS")
    cfg = RunConfig(
        arm=args.arm,
        model=args.model,
        num_clients=args.num_partitions,
        train_limit=0,  # partitions of the whole training split, as a real federation would use
        local_epochs=args.epochs,
        batch_size=args.batch_size,
        device="cpu",
        data_dir=args.data_dir,
    )
    message, _ = round_messages(cfg)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": args.num_partitions, "data-dir": args.data_dir},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    # The partition first, through the ClientApp's own cache, so decode time and memory are told apart
    # from training; the handler then finds it decoded, as a ClientApp process would after this step.
    from fedcsg.fl.run_data import client_data

    data_start = time.perf_counter()
    client_data(RunConfig.from_mapping(cfg.to_flower()), 0, args.num_partitions)
    data_seconds = time.perf_counter() - data_start
    rss_after_data = _status_kib("VmRSS")
    handler_start = time.perf_counter()
    reply = train(message, context)
    handler_seconds = time.perf_counter() - handler_start
    metrics = reply.content["metrics"]
    result = {
        "arm": args.arm,
        "model": args.model,
        "threads": torch.get_num_threads(),
        "examples": int(metrics["num-examples"]),
        "epochs": args.epochs,
        "epoch_seconds": float(metrics["train-seconds"]) / args.epochs,
        "handler_seconds": handler_seconds,
        "data_seconds": data_seconds,
        "start_seconds": imported - started,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "rss_after_import_bytes": rss_after_import * 1024,
        "rss_after_data_bytes": rss_after_data * 1024,
        "train_loss": float(metrics["train-loss"]),
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(arm: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", __spec__.name, "--child", "--arm", arm]  # run from the checkout: -m
    command += ["--model", args.model, "--num-partitions", str(args.num_partitions), "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size), "--data-dir", args.data_dir]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(args.core), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    wall = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    wall = time.perf_counter() - wall
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{arm}: child exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "process_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="fedavg,csg,csg-frozen")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--num-partitions", type=int, default=10, help="partitions of the train split (default 10)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--core", type=int, default=0, help="the CPU core to pin to")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm: fastest epoch, largest peak")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--data-dir", default=os.environ.get("FEDCSG_DATA_DIR", ""))
    parser.add_argument("--json", default=str(RESULTS / "bench_device_client.json"))
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("no data: pass --data-dir or set FEDCSG_DATA_DIR")
    if args.child:
        child(args)
        return 0
    load_before = os.getloadavg()
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        # Arms interleaved, order rotated per repeat: on a shared machine a burst of someone else's load
        # then hits different arms, and the fastest of the repeats is the least disturbed.
        for arm in arms[repeat % len(arms) :] + arms[: repeat % len(arms)]:
            runs[arm].append(measure(arm, args))
    rows = []
    for arm in arms:
        best = min(runs[arm], key=lambda r: r["epoch_seconds"])
        rows.append({**best, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[arm]), "runs": runs[arm]})
    load_after = os.getloadavg()
    header = (
        f"{'arm':<12}{'images':>8}{'epoch s':>9}{'handler s':>11}{'data s':>8}{'start s':>9}"
        f"{'peak MiB':>10}{'imports MiB':>13}{'+data MiB':>11}"
    )
    print(
        f"{args.model}, 1 thread pinned to core {args.core}, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"best of {args.repeats} run(s)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        mib = {k: row[f"{k}_bytes"] / 2**20 for k in ("peak_rss", "rss_after_import", "rss_after_data")}
        print(
            f"{row['arm']:<12}{row['examples']:>8,}{row['epoch_seconds']:>9.1f}{row['handler_seconds']:>11.1f}"
            f"{row['data_seconds']:>8.1f}{row['start_seconds']:>9.1f}{mib['peak_rss']:>10.0f}"
            f"{mib['rss_after_import']:>13.0f}{mib['rss_after_data'] - mib['rss_after_import']:>11.0f}"
        )
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (2-core machine, shared)")
    document = {
        "benchmark": "bench_device_client",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "child", "arm")},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
    }
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
