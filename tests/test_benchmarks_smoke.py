"""Smoke tests of the benchmark scripts in simulations/ (tiny sizes; the full runs are manual)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fedcsg.nn.execution import precision_problem
from simulations.benchmarks import bench_bytes, bench_generation


def test_bench_bytes_smoke(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    code = bench_bytes.main(
        ["--models", "resnet20,resnet56", "--slices", "12x12x3x3:72", "--packing", "flat", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert code == 0 and report["all_pass"] and report["round_trip_exact"]
    rows = {(r["model"], r["arm"]): r for r in report["rows"]}
    assert set(rows) == {(m, a) for m in ("resnet20", "resnet56") for a in ("fedavg", "fedpara", "csg", "csg-frozen")}
    for row in report["rows"]:
        assert row["packing"] == "flat" and row["slice"] == "12x12x3x3" and row["code_dim"] == 72
        for key in ("up", "down", "up_distinct"):
            assert abs(row[f"wire_overhead_{key}_percent"]) < 3.0
        assert row["payload_up"] == row["payload_down"] > 0
    assert rows[("resnet20", "fedavg")]["parameters_total"] == 269_722
    assert rows[("resnet56", "csg")]["parameters_total"] == 160_450
    assert rows[("resnet56", "csg-frozen")]["parameters_sendable"] < rows[("resnet56", "csg")]["parameters_sendable"]
    fedavg_up = rows[("resnet56", "fedavg")]["wire_up"]
    assert fedavg_up / rows[("resnet56", "csg")]["wire_up"] >= 5.0
    assert fedavg_up / rows[("resnet56", "csg-frozen")]["wire_up"] >= 11.0
    assert rows[("resnet56", "csg")]["wire_ratio_up"] >= 5.0
    # FedPara at its default ratio (0.45) sends about 2.4x fewer bytes than ResNet-20's full filters.
    assert 2.0 < rows[("resnet20", "fedavg")]["wire_up"] / rows[("resnet20", "fedpara")]["wire_up"] < 3.0


def test_bench_generation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    argv = "--models resnet20 --repeats 2 --warmup 1 --train-batch 8 --eval-batch 8 --threads 1".split()
    code = bench_generation.main([*argv, "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    # Timings of a tiny run on a shared machine say nothing about the targets: check the shape only.
    assert code in (0, 1) and report["all_pass"] == (code == 0)
    assert [row["model"] for row in report["rows"]] == ["resnet20"]
    row = report["rows"][0]
    assert row["slices"] == ["12x12x3x3/72"]
    assert row["parameters"] == {"plain": 269_722, "csg": 115_426}
    for kind, count in (("train", 2), ("eval", 1)):
        assert len(row[kind]["plain_s"]) == len(row[kind]["csg_s"]) == count
        assert row[kind]["ratio"] > 0 and isinstance(row[kind]["pass"], bool)
        assert set(row[kind]["by_clock"]) == {"wall", "cpu"}
    assert len(row["generation"]["by_clock"]["wall"]["samples_s"]) == 2 and row["generation"]["median_s"] > 0


def test_gpu_check_runs_at_the_tiny_size_on_the_cpu_without_flwr_or_ray(tmp_path: Path, data_dir: Path) -> None:
    """simulations/benchmarks/gpu_check.py --tiny --device cpu, in a process where flwr and ray cannot be
    imported (as on a GPU machine with torch alone): (a)-(c) pass, (d) says why it was skipped."""
    root = Path(__file__).resolve().parents[1]
    blocked = (  # as `python3 -m simulations.benchmarks.gpu_check` from the checkout
        f"import sys, runpy; sys.path.insert(0, {str(root)!r}); sys.modules.update(flwr=None, ray=None); "
        f"sys.argv = ['gpu_check', '--tiny', '--device', 'cpu', '--out', {str(tmp_path)!r}]; "
        "runpy.run_module('simulations.benchmarks.gpu_check', run_name='__main__')"
    )
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    arms = {a["arm"]: a for a in report["arms"]}
    assert list(arms) == ["fedavg", "csg", "csg-frozen", "fedpara", "csg+int8/delta-int8"]
    assert all(a["ok"] and a["all_on_device"] and len(a["losses"]) == 3 for a in arms.values())
    assert arms["csg-frozen"]["frozen_parameters"] == 1 and arms["csg"]["frozen_parameters"] == 0
    assert report["reproducibility"]["deterministic_equal"] and report["reproducibility"]["cpu_device_gap"] == 0.0
    # every arm at every precision, eager (the tiny size compiles nothing); a precision the CPU lacks is
    # skipped with the reason, fp32 always runs
    assert [(r["arm"], r["precision"], r["compiled"]) for r in report["throughput"]] == [
        (arm, p, False) for arm in arms for p in ("fp32", "bf16", "fp16")
    ]
    for cell in report["throughput"]:
        assert ("images_per_s" in cell) == (precision_problem(cell["precision"], torch.device("cpu")) == "")
    assert report["federated"] == [
        {"precision": p, "compile": c, "skipped": "needs flwr, ray", "ok": None}
        for p, c in (("fp32", "off"), ("fp32", "on"), ("bf16", "off"), ("bf16", "on"))
    ]
    assert "| csg-frozen | True | True | True | n/a (CPU) |" in (tmp_path / "gpu_check.md").read_text()
