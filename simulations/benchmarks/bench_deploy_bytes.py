"""Bytes that really cross the network per round in deployment, beside the bytes fedcsg accounts for.

For each arm this starts a real SuperLink (TLS, SuperNode authentication) and two SuperNodes on
127.0.0.1, with a byte-counting TCP relay (``simulations/tools/relay.py``) between the
SuperNodes and the SuperLink's Fleet API, and runs the fedcsg app with ``flwr run`` on a tiny
CIFAR-10 subset. The ServerApp writes ``arms/ARM.json`` after every round's evaluation; the moments
those records appear cut the relay's byte log into rounds. Per round and direction:

``payload``
    raw tensor bytes of the messages (fedcsg's ``payload_bytes``, summed over both SuperNodes);
``serialization``
    Flower's message serialization on top of the payload (fedcsg's ``wire_bytes - payload``:
    array headers, keys, config, metadata, object envelopes);
``transport``
    what the relay saw beyond that: HTTP/1.1 request and response headers, the protobuf requests
    around the objects (pull/push/confirm), polling and heartbeats of the window, TLS records and
    handshakes of new connections.

``idle`` is measured before the run over ``--idle-seconds`` (polling every 3 s and heartbeats of two
idle SuperNodes), and ``polling est.`` = idle rate x the round's seconds, the part of ``transport``
that would be there without any message. Round 1 also carries the one-time run setup: each
SuperNode fetches the run and the app bundle (FAB, ``fab`` bytes, built here the same way).

Usage::

    FEDCSG_DATA_DIR=/work/shared/data python3 -m simulations.benchmarks.bench_deploy_bytes
    python3 -m simulations.benchmarks.bench_deploy_bytes --arms csg --rounds 1 --idle-seconds 10

Writes ``simulations/results/bench_deploy_bytes.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import flwr

from fedcsg.deploy.federation import FederationPlan, RunOutcome, run_app, start_federation, wait_for_nodes
from fedcsg.processes import free_port
from fedcsg.runs.layout import arm_record_path
from simulations.benchlib import RESULTS, ROOT, fab_bytes, write_json
from simulations.tools.relay import ByteCountingRelay, Traffic


def _watch_rounds(record: Path, times: dict[int, float], stop: threading.Event) -> None:
    """Record the relay-clock time at which each round's record first appears in ``record``."""
    while not stop.is_set():
        try:
            rounds = json.loads(record.read_text()).get("rounds", [])
        except (OSError, json.JSONDecodeError):
            rounds = []
        now = time.monotonic()
        for entry in rounds:
            times.setdefault(int(entry["round"]), now)
        stop.wait(0.05)


def measure_arm(arm: str, args: argparse.Namespace, work: Path) -> dict:
    """Start a relayed secure federation, measure idle traffic and one run of ``arm``; stop everything."""
    port = free_port()
    relay = ByteCountingRelay("127.0.0.1", port).start()
    plan = FederationPlan(
        directory=work / arm,
        nodes=2,
        data_dir=args.data_dir,
        port=port,
        connection=f"bench-{arm}",
        fleet_address=relay.address,
        # One thread per process: two ClientApps train at once on a shared 2-core machine.
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        supervise=False,  # the processes measured are the bare SuperNodes
    )
    federation = None
    try:
        federation = start_federation(plan)
        wait_for_nodes(federation, 2, timeout=120)
        idle_start = relay.now()
        time.sleep(args.idle_seconds)
        idle = relay.traffic(idle_start, relay.now())
        out_dir = work / arm / "out"
        run_config = {
            "arm": arm,
            "model": args.model,
            "num-rounds": args.rounds,
            "num-clients": 2,
            "train-limit": args.train_limit,
            "test-limit": args.test_limit,
            "batch-size": 32,
            "device": "cpu",
            "out-dir": str(out_dir),
            "round-timeout": 600.0,
        }
        if args.data_dir:
            run_config["data-dir"] = str(Path(args.data_dir).resolve())
        times: dict[int, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_rounds, args=(arm_record_path(out_dir, arm), times, stop))
        run_start = relay.now()
        watcher.start()
        try:
            outcome: RunOutcome = run_app(federation, ROOT, run_config, timeout=args.timeout)
        finally:
            stop.set()
            watcher.join()
        run_end = relay.now()
        if (outcome.status, outcome.sub_status) != ("finished", "completed"):
            raise RuntimeError(f"{arm}: run {outcome.run_id} ended {outcome.status}:{outcome.sub_status}")
        document = json.loads((arm_record_path(out_dir, arm)).read_text())
        missing = [r for r in range(args.rounds + 1) if r not in times]
        if missing:
            raise RuntimeError(f"{arm}: no record time for rounds {missing}")
        rounds = []
        for entry in document["rounds"][1:]:
            r = int(entry["round"])
            window = relay.traffic(times[r - 1], times[r])
            rounds.append(_round_row(arm, r, window, entry, idle))
        setup = relay.traffic(run_start, times[0])
        tail = relay.traffic(times[args.rounds], run_end)
        return {
            "arm": arm,
            "run_id": outcome.run_id,
            "payload_bytes": document["payload_bytes"],
            "idle": _traffic_dict(idle),
            "idle_bytes_per_second": idle.total / idle.seconds if idle.seconds else 0.0,
            "setup": _traffic_dict(setup),
            "tail": _traffic_dict(tail),
            "rounds": rounds,
        }
    finally:
        if federation is not None:
            federation.stop()
        relay.stop()


def _traffic_dict(t: Traffic) -> dict:
    return {"up": t.up, "down": t.down, "connections": t.connections, "seconds": round(t.seconds, 3)}


def _round_row(arm: str, r: int, window: Traffic, entry: dict, idle: Traffic) -> dict:
    rate = {d: getattr(idle, d) / idle.seconds if idle.seconds else 0.0 for d in ("up", "down")}
    row = {"arm": arm, "round": r, "seconds": round(window.seconds, 3), "connections": window.connections}
    for d in ("up", "down"):
        relay_bytes, wire, payload = getattr(window, d), int(entry[f"wire_{d}"]), int(entry[f"payload_{d}"])
        polling = rate[d] * window.seconds
        row[d] = {
            "relay": relay_bytes,
            "wire": wire,
            "payload": payload,
            "serialization": wire - payload,
            "transport": relay_bytes - wire,
            "polling_estimate": round(polling),
            "per_message_transport": round(relay_bytes - wire - polling),
            "relay_over_payload": relay_bytes / payload if payload else None,
        }
    return row


def print_table(results: list[dict], fab: int) -> None:
    header = (
        f"{'arm':<8}{'rnd':>4}{'dir':>5}{'relay':>12}{'payload':>12}{'serial.':>9}{'transport':>11}"
        f"{'poll est.':>10}{'relay/pay':>10}{'secs':>7}{'conns':>6}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        for row in result["rounds"]:
            for d in ("up", "down"):
                c = row[d]
                print(
                    f"{row['arm']:<8}{row['round']:>4}{d:>5}{c['relay']:>12,}{c['payload']:>12,}"
                    f"{c['serialization']:>9,}{c['transport']:>11,}{c['polling_estimate']:>10,}"
                    f"{c['relay_over_payload']:>10.3f}{row['seconds']:>7.1f}{row['connections']:>6}"
                )
        idle = result["idle"]
        print(
            f"{result['arm']:<8} idle {idle['seconds']:.0f}s: up {idle['up']:,} B, down {idle['down']:,} B "
            f"({result['idle_bytes_per_second']:.0f} B/s for 2 SuperNodes, {idle['connections']} new connections)"
        )
    print(f"app bundle (FAB) each SuperNode fetches once per run, in round 1: {fab:,} bytes (zip)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="fedavg,csg")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=256, help="images shared by the 2 SuperNodes")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=31.0, help="> 30 s: one heartbeat per node")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--data-dir", default=os.environ.get("FEDCSG_DATA_DIR"))
    parser.add_argument("--json", default=str(RESULTS / "bench_deploy_bytes.json"))
    parser.add_argument("--work", help="working directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("no data: pass --data-dir or set FEDCSG_DATA_DIR")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedcsg-deploy-bytes-") as tmp:
        work = Path(args.work or tmp)
        results = [measure_arm(arm.strip(), args, work) for arm in args.arms.split(",") if arm.strip()]
    fab = fab_bytes()
    print_table(results, fab)
    document = {
        "benchmark": "bench_deploy_bytes",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
        "fab_bytes": fab,
        "seconds": round(time.time() - started, 1),
        "arms": results,
    }
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
