"""GPU shares on a machine without a GPU: a private Ray that DECLARES one (Ray's own
``RAY_OVERRIDE_RESOURCES``), so Ray hands out shares of it and sets each client's
``CUDA_VISIBLE_DEVICES``, while torch, finding no CUDA device, trains on the CPU. The two runs
(``client-num-gpus`` "auto" and 0) are started at once by a module fixture; the other checks here
need no Ray."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, Popen

import pytest
import torch

from fedcsg.cli import main
from fedcsg.cli.runs import Placement, _finish, asks_for_gpus, cpu_clients_line
from fedcsg.fl.ray_cluster import RESOURCES_ENV, local_resources, resolve_resources
from fedcsg.runs.records import RunFailed
from fedcsg.spec.config import RunConfig
from fedcsg.spec.resources import client_gpu_share, server_device

ROOT = Path(__file__).resolve().parents[1]
# The quick-start model (Fashion-MNIST's small CNN) at the smallest size: 2 clients, 1 round, 1 arm.
TINY = ["num-clients=2", "num-rounds=1", "train-limit=128", "test-limit=64", "batch-size=32"]
DECLARED_GPU = '{"GPU": 1}'


def _sets(pairs: list[str]) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


@pytest.fixture(scope="module")
def declared_gpu_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """`fedcsg run --arm fedavg` of the quick-start file, TINY, on a private Ray declaring 1 GPU:
    ``auto`` with the default client-num-gpus, ``zero`` with client-num-gpus = 0; both at once."""
    root = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "FEDCSG_DATA_DIR": str(data_dir), RESOURCES_ENV: DECLARED_GPU}
    quickstart = str(ROOT / "configs" / "quickstart.toml")
    procs = {}
    for name, extra in (("auto", []), ("zero", ["client-num-gpus=0"])):
        args = ["run", "--config", quickstart, "--arm", "fedavg", "--out", str(root / name), *_sets([*TINY, *extra])]
        procs[name] = (
            root / name,
            Popen([sys.executable, "-m", "fedcsg.cli", *args], stdout=PIPE, stderr=PIPE, text=True, env=env, cwd=ROOT),
        )
    yield {name: _finished(*pair) for name, pair in procs.items()}
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _finished(out: Path, proc: Popen) -> tuple[Path, subprocess.CompletedProcess]:
    stdout, stderr = proc.communicate(timeout=600)
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@functools.cache
def _record(out: Path) -> dict:
    return json.loads((out / "arms" / "fedavg.json").read_text())


def test_auto_gives_each_client_a_share_of_the_declared_gpu(declared_gpu_runs: dict[str, tuple]) -> None:
    """Ray shows the share's GPU to each client (CUDA_VISIBLE_DEVICES "0"); with no real CUDA device
    the clients train on the CPU, every reply says so, and the run ends with one line saying it."""
    out, run = declared_gpu_runs["auto"]
    assert run.returncode == 0, run.stderr[-3000:]
    record = _record(out)
    assert record["config"]["client-num-gpus"] == 0.25 and record["config"]["server-device"] == "cpu"
    (trained,) = [r for r in record["rounds"] if r["round"] == 1]
    assert trained["visible_devices"] == ["0", "0"] and trained["devices"] == ["cpu", "cpu"]
    assert record["server_device"] == "cpu"
    notes = [line for line in run.stderr.splitlines() if "trained on the CPU" in line]
    assert notes == [
        "fedcsg: note: clients trained on the CPU although the Ray cluster has 1 GPU(s) on a node (fedavg 2 of 2 "
        "replies): their process saw no CUDA device (CUDA_VISIBLE_DEVICES is in each round's visible_devices)"
    ]
    report = (out / "report.md").read_text()
    assert "| arm | clients trained on | server evaluated on |" in report and "| fedavg | cpu (2) | cpu |" in report
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["fedavg"]["client_devices"] == {"cpu": 2}


def test_zero_hides_the_gpu_from_the_clients(declared_gpu_runs: dict[str, tuple]) -> None:
    out, run = declared_gpu_runs["zero"]
    assert run.returncode == 0, run.stderr[-3000:]
    record = _record(out)
    (trained,) = [r for r in record["rounds"] if r["round"] == 1]
    assert record["config"]["client-num-gpus"] == 0.0
    assert trained["visible_devices"] == ["", ""] and trained["devices"] == ["cpu", "cpu"]


def test_a_cpu_run_resumes_under_other_device_settings(
    declared_gpu_runs: dict[str, tuple],
    data_env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Devices and shares are not the run's identity: a run made with client-num-gpus = 0 is taken up
    with other device settings, on the same declared GPU (its one arm complete: nothing left to train,
    no Ray started)."""
    monkeypatch.setenv(RESOURCES_ENV, DECLARED_GPU)
    out, run = declared_gpu_runs["zero"]
    assert run.returncode == 0, run.stderr[-3000:]
    changed = ["device=cpu", "server-device=cpu", "client-num-gpus=0.5", "clients-per-gpu=2", "deterministic=true"]
    capsys.readouterr()
    assert main(["run", "--resume", str(out), *_sets(changed)]) == 0, capsys.readouterr().err
    assert "== arm fedavg: complete (1 rounds), skipped" in capsys.readouterr().out
    assert main(["run", "--resume", str(out), "--set", "seed=1"]) == 2
    assert "the config differs from the run in" in capsys.readouterr().err


def test_the_share_rule() -> None:
    """auto: none without GPUs; 1 / clients-per-gpu with them; one tenant fewer when the server is on a GPU."""
    assert client_gpu_share("auto", 4, 0.0, server_on_gpu=False) == 0.0
    assert client_gpu_share("auto", 4, 2.0, server_on_gpu=False) == 0.25
    assert client_gpu_share("auto", 4, 1.0, server_on_gpu=True) == pytest.approx(1 / 3)
    assert client_gpu_share(0.5, 4, 0.0, server_on_gpu=True) == 0.5
    assert server_device("auto", cuda_here=False) == "cpu" and server_device("auto", cuda_here=True) == "cuda"
    cfg = resolve_resources(RunConfig(), [{"CPU": 16.0, "GPU": 1.0}], cuda_here=True)
    assert (cfg.client_num_gpus, cfg.server_device) == (pytest.approx(1 / 3), "cuda")
    assert asks_for_gpus(RunConfig(client_num_gpus=0.5)) and not asks_for_gpus(RunConfig())


def test_declared_resources_are_read_as_ray_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESOURCES_ENV, DECLARED_GPU)
    assert local_resources()["GPU"] == 1.0
    monkeypatch.delenv(RESOURCES_ENV)
    assert local_resources()["GPU"] == 0.0  # this machine has no CUDA device


def test_cuda_without_a_gpu_share_is_refused_before_round_one(
    data_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    for sets, message in (
        (["device=cuda"], "fedcsg run: error: device = 'cuda' is not accepted here: client-num-gpus = 'auto' gives"),
        (
            ["device=cuda", "client-num-gpus=0"],
            "fedcsg run: error: device = 'cuda' is not accepted with client-num-gpus = 0",
        ),
        (["server-device=cuda"], "fedcsg run: error: server-device = 'cuda' is not accepted here: this machine has no"),
        (["client-num-gpus=-1"], 'fedcsg run: error: client-num-gpus = -1 is not accepted: "auto" or a finite'),
        (["client-num-gpus=some"], "fedcsg run: error: client-num-gpus = 'some' is not accepted"),
    ):
        capsys.readouterr()
        assert main(["run", "--arm", "fedavg", "--out", str(out), *_sets(sets)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), lines
        assert not out.exists()


def test_clients_on_the_cpu_fail_a_run_that_asked_for_gpus(declared_gpu_runs: dict[str, tuple]) -> None:
    """The end-of-run check on recorded runs: a note under "auto", a failure (exit 1) where a setting
    asked for GPUs, nothing on a cluster without GPUs."""
    out, _ = declared_gpu_runs["auto"]
    runs = [RunConfig(arm="fedavg", out_dir=str(out))]
    assert cpu_clients_line(runs, 0.0) == ""
    assert cpu_clients_line(runs, 1.0).startswith("clients trained on the CPU although the Ray cluster has 1 GPU(s)")
    with pytest.raises(RunFailed, match="clients trained on the CPU"):
        _finish(out, runs, Placement(1.0, asked=True))


def test_epoch_draws_are_the_per_batch_draws_of_before() -> None:
    """The epoch's augmentation draws, made up front for one copy to the device, are the numbers that
    drawing batch by batch gives: the augmented batches are unchanged."""
    from fedcsg.data.batches import TensorBatches, augment_batch, normalize_batch
    from fedcsg.data.readers import ImageData
    from fedcsg.data.registry import get_spec

    spec = get_spec("cifar10")
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    data = ImageData(images, torch.arange(20) % 10, spec)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    generator = torch.Generator().manual_seed(5)
    order = torch.randperm(20, generator=generator)
    expected = [normalize_batch(augment_batch(images[order[i : i + 8]], generator), mean, std) for i in (0, 8, 16)]
    got = [x for x, _ in TensorBatches(data, 8, shuffle=True, augment=True, seed=5)]
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_deterministic_switches_and_back() -> None:
    from fedcsg.nn.determinism import CUBLAS_WORKSPACE, deterministic_state, set_deterministic

    before = deterministic_state()
    try:
        set_deterministic(True)
        state = deterministic_state()
        assert state["deterministic_algorithms"] and state["cudnn_deterministic"] and not state["cudnn_benchmark"]
        assert not state["cudnn_allow_tf32"] and not state["matmul_allow_tf32"]
        assert state[CUBLAS_WORKSPACE[0]] is not None
        set_deterministic(False)
        assert not deterministic_state()["deterministic_algorithms"]
    finally:
        set_deterministic(bool(before["deterministic_algorithms"]))
        torch.backends.cudnn.allow_tf32 = bool(before["cudnn_allow_tf32"])
