"""The fedcsg ServerApp: one arm of a federated run with CSGFedAvg, server-side evaluation on the
test split after every round, and per-round records with bytes in both directions."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedcsg.config import RunConfig
from fedcsg.params import count_parameters
from fedcsg.payload import load_payload, model_payload
from fedcsg.results import ArmRecorder, write_report
from fedcsg.strategy import CSGFedAvg, RoundTraffic, lr_schedule
from fedcsg.task import build_arm_model, evaluate_model, payload_layout, test_data
from fedcsg.training import get_device, set_seed

app = ServerApp()


def sampling(cfg: RunConfig) -> dict[str, float | int]:
    """FedAvg's sampling arguments: a fixed count per round is a fraction of exactly that many
    clients with that many as the minimum (FedAvg samples max(int(n * fraction), min_train_nodes))."""
    if cfg.clients_per_round:
        count = cfg.clients_per_round
        return {
            "fraction_train": count / cfg.num_clients,
            "min_train_nodes": count,
            "min_available_nodes": max(count, min(cfg.min_available_nodes, cfg.num_clients)),
        }
    return {
        "fraction_train": cfg.fraction_train,
        "min_train_nodes": min(cfg.min_train_nodes, cfg.num_clients),
        "min_available_nodes": min(cfg.min_available_nodes, cfg.num_clients),
    }


def run_federation(grid: Grid, cfg: RunConfig, out_dir: Path, progress: Callable[[str], None] = print) -> list[dict]:
    """Run ``cfg.arm`` for ``cfg.num_rounds`` rounds; write ``out_dir/arms/<arm>.json`` every round."""
    set_seed(cfg.seed)
    random.seed(cfg.seed)  # FedAvg samples clients with Python's `random`: same sample for every arm
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    device = get_device(cfg.device)
    test = test_data(cfg)
    strategy = CSGFedAvg(layout, lr_fn=lr_schedule(cfg.lr, cfg.lr_schedule, cfg.num_rounds), **sampling(cfg))
    counts = count_parameters(model)
    recorder = ArmRecorder(
        out_dir,
        cfg.arm,
        cfg.to_flower(),
        extra={"parameters": counts.as_dict(), "payload_bytes": layout.nbytes, "payload_keys": layout.keys},
    )
    started = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_payload(model, arrays, layout)
        stats = evaluate_model(model, test, cfg, device)
        traffic = strategy.traffic.get(server_round, RoundTraffic(started=started))
        train = strategy.train_metrics.get(server_round, {})
        record = recorder.add(
            {
                "round": server_round,
                "test_accuracy": stats.accuracy,
                "test_loss": stats.loss,
                "train_loss": train.get("train-loss"),
                "train_accuracy": train.get("train-accuracy"),
                "lr": strategy.lr_fn(server_round) if server_round else None,
                **traffic.as_dict(),
                "seconds": time.perf_counter() - traffic.started if server_round else 0.0,
            }
        )
        total_mb = (record["cum_wire_up"] + record["cum_wire_down"]) / 1e6
        progress(
            f"[{cfg.arm}] round {server_round}/{cfg.num_rounds}: test accuracy {stats.accuracy:.4f}, "
            f"loss {stats.loss:.4f}, {total_mb:.2f} MB so far, {time.perf_counter() - started:.1f}s"
        )
        return MetricRecord({"test-accuracy": stats.accuracy, "test-loss": stats.loss})

    strategy.start(
        grid=grid,
        initial_arrays=model_payload(model, layout),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"local-epochs": cfg.local_epochs, "batch-size": cfg.batch_size}),
        evaluate_fn=evaluate_fn,
    )
    return recorder.rounds


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run .`: the run config comes from [tool.flwr.app.config] and --run-config."""
    cfg = RunConfig.from_mapping(dict(context.run_config))
    out_dir = Path(cfg.out_dir or f"runs/flwr-{context.run_id}")
    run_federation(grid, cfg, out_dir, progress=lambda line: print(line, file=sys.stderr, flush=True))
    write_report(out_dir)
