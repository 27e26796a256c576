"""How memory and round time grow with the number of virtual clients.

For each client count, `fedcsg run` (a fresh process, Flower's simulation engine on Ray) trains one
arm on CIFAR-10 split over that many clients by flwr-datasets' IidPartitioner (after a seeded
shuffle: 50,000 images / N per client, so about 5 images each at 10,000 clients), sampling a fixed
number of clients per round. The peak resident memory of the whole process tree (the fedcsg
process, Ray's GCS, raylet and worker processes) is sampled every 0.25 s; seconds per round come
from the run's own records.

Targets: peak memory at the largest count <= 2x the peak at the smallest (no per-client state is
held for clients that are not sampled) and seconds per round flat in the number of clients.

Usage::

    python3 -m simulations.benchmarks.bench_scale                         # 100, 1000, 10000 clients, 10 per round
    python3 -m simulations.benchmarks.bench_scale --clients 100,100000 --clients-per-round 50 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys

from simulations.benchlib import RESULTS, add_config_argument, print_table, run_fedcsg, write_json


def scale_run(count: int, args: argparse.Namespace) -> dict:
    sets = {
        "model": args.model,
        "num-clients": count,
        "clients-per-round": args.clients_per_round,
        "min-train-nodes": args.clients_per_round,
        "min-available-nodes": args.clients_per_round,
        "num-rounds": args.rounds,
        "partitioner": "iid",
        "train-limit": args.train_limit,
        "test-limit": args.test_limit,
        "local-epochs": 1,
        "device": args.device,
    }
    run, records = run_fedcsg(args.arm, sets, args.timeout, args.config)
    rounds = [r for r in records if r["round"] > 0]
    seconds = [r["seconds"] for r in rounds]
    return {
        "clients": count,
        "config": sets,
        "peak_rss_mb": run.peak_rss / 2**20,
        "round_seconds": seconds,
        "steady_round_seconds": statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "startup_seconds": run.first_time("round 0/"),
        "total_seconds": run.seconds,
        "sampled_partitions": [r["partitions"] for r in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,10000")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="resnet20")
    add_config_argument(parser)
    parser.add_argument("--arm", default="csg", choices=["fedavg", "csg", "csg-frozen"])
    parser.add_argument("--train-limit", type=int, default=0, help="0 = the whole CIFAR-10 train split")
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", default=str(RESULTS / "bench_scale.json"))
    args = parser.parse_args(argv)

    results = [scale_run(int(c), args) for c in args.clients.split(",")]
    base = results[0]
    rows = []
    for r in results:
        memory_ratio = r["peak_rss_mb"] / base["peak_rss_mb"]
        time_ratio = r["steady_round_seconds"] / base["steady_round_seconds"]
        rows.append(
            [
                r["clients"],
                r["peak_rss_mb"],
                memory_ratio,
                "PASS" if memory_ratio <= 2 else "FAIL",
                r["round_seconds"][0],
                r["steady_round_seconds"],
                time_ratio,
                r["startup_seconds"],
            ]
        )
    print(
        f"{args.model} {args.arm}, IID partitions of CIFAR-10, {args.clients_per_round} clients per round, "
        f"{args.rounds} rounds of 1 local epoch"
    )
    print_table(
        ["clients", "peak MB", "x smallest", "<=2x", "round 1 s", "round 2+ s", "x smallest", "start-up s"], rows
    )
    write_json(args.json, {"benchmark": "scale", "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
