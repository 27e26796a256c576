"""A two-round segmentation compare through Flower's simulation engine on Ray (issue 26): the shipped
fmnist-seg-deeplabv3 config shrunk to 2 clients and 32 canvases; mIoU recorded as the accuracy, and
each arm's bytes those of `fedcsg bytes`' offline messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SETS = ["num-clients=2", "num-rounds=2", "train-limit=32", "test-limit=16", "batch-size=8", "eval-batch-size=16"]


def test_segmentation_compare_through_ray(tmp_path: Path, data_dir: Path) -> None:
    from fedcsg.fl.traffic import arm_traffic
    from fedcsg.spec.config import RunConfig

    out = tmp_path / "run"
    args = ["compare", "--config", "fmnist-seg-deeplabv3", "--out", str(out)]
    args += [item for pair in SETS for item in ("--set", pair)]
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedcsg.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["arms"]) == ["csg", "csg-frozen", "fedavg"]
    cfg = RunConfig.from_mapping({k: v for k, v in results["config"].items() if k in RunConfig().to_flower()})
    assert (cfg.model, cfg.dataset) == ("deeplabv3-small", "fashion-mnist-seg")
    for arm, data in results["arms"].items():
        rounds = data["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)  # mean IoU
        offline = arm_traffic(cfg.replace(arm=arm), 2)
        for r in rounds[1:]:
            assert (r["replied"], r["rejected"]) == (2, 0), (arm, r)
            assert r["payload_up"] == offline["payload_up"] and r["payload_down"] == offline["payload_down"]
            assert 0 <= r["wire_up"] - offline["wire_up"] < 2 * 100
    up = {arm: data["rounds"][1]["payload_up"] for arm, data in results["arms"].items()}
    assert up["csg-frozen"] < up["csg"] < up["fedavg"]
    report = (out / "report.md").read_text()
    assert "| arm | up | down | final mIoU | best mIoU |" in report and "## Test mean IoU per round" in report
    assert "final acc" not in report
