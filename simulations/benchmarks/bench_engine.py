"""Overhead of Flower's simulation engine (Ray backend) over the clients' own work.

For each client count, one arm runs twice through the engine (`fedcsg run`, as a user would:
a fresh process, Ray started and stopped inside it) and once as a plain Python loop in this
process that does the same work: for every client, load the global payload, train on the same
partition with the same seed and epochs, pack the reply; then average and evaluate on the server.
Round times are compared at steady state (round 2 onwards); the start-up time (from the command's
launch to the start of round 1, i.e. after the initial evaluation) is reported separately.

Each variant gives the engine's clients and the loop the same number of torch threads T: with
``num-cpus=T`` Ray runs cores/T clients at once, each with T threads (Ray sets OMP_NUM_THREADS). The
target (<= 1.15x) is for T = all cores, where both run one client at a time with every core; with
T = 1 the engine runs clients in parallel and the loop does not, which shows what Ray buys.
Under load, torch with T > 1 threads can be several times slower than with 1 (OpenMP threads wait
for each other): run this on a quiet machine.

Usage::

    python3 -m simulations.benchmarks.bench_engine                      # 4 and 10 clients, resnet20, csg arm
    python3 -m simulations.benchmarks.bench_engine --clients 4,10,50 --images-per-client 1000 \
        --device cuda --client-num-gpus 0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fedcsg.fl.run_data import client_data, test_data
from fedcsg.fl.task import build_arm_model, evaluate_model, local_train, payload_layout
from fedcsg.nn.training import get_device
from fedcsg.spec.config import RunConfig
from fedcsg.spec.experiments import load_experiment
from fedcsg.wire.payload import load_payload, model_payload, weighted_average
from simulations.benchlib import RESULTS, add_config_argument, print_table, run_fedcsg, write_json


def engine_rounds(cfg: RunConfig, sets: dict[str, object], timeout: float, config: str) -> dict:
    """Run ``fedcsg run`` in a fresh process; return its per-round seconds and start-up time."""
    run, rounds = run_fedcsg(cfg.arm, sets, timeout, config)
    return {
        "round_seconds": [r["seconds"] for r in rounds if r["round"] > 0],
        "startup_seconds": run.first_time("round 0/"),
        "total_seconds": run.seconds,
        "peak_rss_mb": run.peak_rss / 2**20,
    }


def loop_rounds(cfg: RunConfig, threads: int) -> list[float]:
    """The same rounds as a plain loop in this process (the reference for the engine's overhead)."""
    torch.set_num_threads(threads)
    device = get_device(cfg.device)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    global_arrays = model_payload(model, layout)
    test = test_data(cfg)
    clients = [
        client_data(cfg, pid, cfg.num_clients) for pid in range(cfg.num_clients)
    ]  # decoded once, as Ray's actors cache them
    seconds = []
    for server_round in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        replies, weights = [], []
        for pid, data in enumerate(clients):
            load_payload(model, global_arrays, layout)
            stats = local_train(
                model,
                data,
                cfg,
                lr=cfg.lr,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                seed=cfg.seed * 1_000_003 + server_round * 10_007 + pid,
                device=device,
            )
            model.to("cpu")
            replies.append(model_payload(model, layout))
            weights.append(stats.num_examples)
        global_arrays = weighted_average(replies, weights)
        load_payload(model, global_arrays, layout)
        evaluate_model(model, test, cfg, device)
        model.to("cpu")
        seconds.append(time.perf_counter() - start)
    return seconds


def steady(values: list[float]) -> float:
    """Mean of round 2 onwards (round 1 pays for actor start-up and first-touch caches)."""
    return statistics.mean(values[1:]) if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="4,10", help="comma-separated client counts")
    parser.add_argument("--model", default="resnet20")
    add_config_argument(parser)
    parser.add_argument("--arm", default="csg", choices=["fedavg", "csg", "csg-frozen"])
    parser.add_argument("--images-per-client", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per client (target variant)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--client-num-gpus", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=str(RESULTS / "bench_engine.json"))
    args = parser.parse_args(argv)

    rows, results = [], []
    for count in (int(c) for c in args.clients.split(",")):
        sets = {
            "model": args.model,
            "num-clients": count,
            "clients-per-round": count,
            "min-train-nodes": count,
            "min-available-nodes": count,
            "num-rounds": args.rounds,
            "train-limit": count * args.images_per_client,
            "test-limit": args.test_limit,
            "local-epochs": args.local_epochs,
            "batch-size": args.batch_size,
            "device": args.device,
            "client-num-gpus": args.client_num_gpus,
        }
        cfg = RunConfig.from_mapping(sets, load_experiment(args.config)).replace(arm=args.arm)
        variants = {}
        for threads in sorted({1, args.threads}):
            loop = loop_rounds(cfg, threads)
            engine = engine_rounds(cfg, {**sets, "client-num-cpus": threads}, args.timeout, args.config)
            variants[threads] = {"loop_round_seconds": loop, "engine": engine}
            ratio = steady(engine["round_seconds"]) / steady(loop)
            target = threads == args.threads
            rows.append(
                [
                    count,
                    threads,
                    steady(engine["round_seconds"]),
                    steady(loop),
                    ratio,
                    ("PASS" if ratio <= 1.15 else "FAIL") if target else "(info)",
                    engine["startup_seconds"],
                    "PASS" if engine["startup_seconds"] is not None and engine["startup_seconds"] <= 10 else "FAIL",
                ]
            )
        results.append({"clients": count, "config": sets, "variants": {str(k): v for k, v in variants.items()}})
    print(
        f"{args.model} {args.arm}, {args.images_per_client} images per client, {args.local_epochs} local epoch(s), "
        f"{args.rounds} rounds; steady state = mean of rounds 2..{args.rounds}"
    )
    print_table(
        ["clients", "threads", "engine s/round", "loop s/round", "ratio", "<=1.15x", "start-up s", "<=10 s"], rows
    )
    write_json(args.json, {"benchmark": "engine", "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
