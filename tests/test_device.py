"""The client on a device: what the ClientApp's training path imports and how much memory it takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedcsg.data import partitions
from fedcsg.fl import run_data
from fedcsg.fl.run_data import partition_rows
from fedcsg.spec.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flwr_datasets", "datasets", "matplotlib", "torchvision")

# One round of the real ClientApp (fedcsg.fl.client_app.train) on its partition, in a fresh
# interpreter: the modules it imported and its peak RSS.
CLIENT_ROUND = """
import json, resource, sys
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedcsg.fl import client_app
from fedcsg.spec.config import RunConfig
from fedcsg.wire.payload import model_payload
from fedcsg.wire.messages import TrainInstruction
from fedcsg.fl.task import build_arm_model, payload_layout

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a SuperNode sets them
cfg = RunConfig.from_mapping(json.loads(sys.argv[1]))
model = build_arm_model(cfg)
sent = model_payload(model, payload_layout(cfg, model))
context = Context(1, 1, {"partition-id": 1, "num-partitions": cfg.num_clients}, RecordDict(), cfg.to_flower())
config = TrainInstruction(cfg.local_epochs, cfg.batch_size, server_round=1, lr=0.05).record()
down = Message(RecordDict({"arrays": sent, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
reply = client_app.train(down, context)
assert reply.content["metrics"]["num-examples"] > 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(json.dumps({"heavy": heavy, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _client_round(cfg: RunConfig, cache: Path, data_dir: Path) -> dict:
    env = {**os.environ, "FEDCSG_CACHE_DIR": str(cache), "FEDCSG_DATA_DIR": str(data_dir)}
    run = subprocess.run(
        [sys.executable, "-c", CLIENT_ROUND, json.dumps(cfg.to_flower()), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_the_client_trains_a_round_without_flwr_datasets_matplotlib_or_torchvision(
    data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """With its partition in the cache (as `fedcsg run` leaves it, or a deployment hands it over),
    a ClientApp's round of csg ResNet-20 imports none of flwr_datasets, datasets, matplotlib or
    torchvision; without it, the client computes its partition with flwr-datasets (and says so in
    ``sys.modules``), the fallback that keeps a bare node working."""
    cfg = RunConfig(arm="csg", num_clients=2, train_limit=256, batch_size=32, data_dir=str(data_dir))
    cold = _client_round(cfg, tmp_path / "cold", data_dir)
    monkeypatch.setenv("FEDCSG_CACHE_DIR", str(tmp_path / "warm"))
    partitions._all_partitions.cache_clear()  # computed here, not found in this process's memory
    run_data._partition_rows.cache_clear()
    partition_rows(cfg, 0, cfg.num_clients)  # what the process that starts a run does
    warm = _client_round(cfg, tmp_path / "warm", data_dir)
    print(f"client round, csg resnet20: peak RSS {cold['peak_rss_mib']:.0f} MiB computing its partition, ", end="")
    print(f"{warm['peak_rss_mib']:.0f} MiB reading it from the cache")
    assert {"datasets", "flwr_datasets"} <= set(cold["heavy"])
    assert warm["heavy"] == []
