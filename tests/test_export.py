"""Model export for devices: checkpoints, compact, TorchScript and ONNX files (`fedcsg export`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save_file

from fedcsg.cli import deploy as deploy_cli
from fedcsg.deploy.export import (
    COMPACT_FORMAT,
    compact_tensors,
    export_checkpoint,
    export_model,
    load_checkpoint,
    load_torchscript,
)
from fedcsg.io import DIGEST_KEY, tensors_digest
from fedcsg.runs.model_file import save_checkpoint, save_global_model
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import ModelSettings
from fedcsg.wire.payload import PayloadLayout, model_payload

GENERATOR_KEY = "csg_generators.3x3.weight"


def calibrated(info: ModelSettings, batches: int = 4) -> torch.nn.Module:
    """A model of ``info`` whose BatchNorm statistics come from a few batches, so outputs are finite.

    A freshly initialised CSG net with unit running statistics overflows in eval mode; any trained
    model has real statistics, which is what this stands in for.
    """
    model = info.build()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(32, info.in_channels, 32, 32, generator=generator))
    return model.eval()


def _cli(argv: list[str]) -> int:
    # The CLI as `fedcsg` will build it: deploy_cli.register on the subparsers of a fresh parser.
    from fedcsg.cli.args import OneLineParser

    parser = OneLineParser(prog="fedcsg")
    deploy_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("arm", ["fedavg", "csg", "csg-frozen"])
def test_checkpoint_and_compact_rebuild_identical_outputs(tmp_path: Path, arm: str) -> None:
    info = ModelSettings(model="resnet20", arm=arm, seed=3)
    model = calibrated(info)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()
    checkpoint = save_checkpoint(model, tmp_path / "model.safetensors", info, extra={"round": "7"})
    _, (compact,) = export_checkpoint(checkpoint, ["compact"])
    assert compact.name == "model.compact.safetensors"
    for path in (checkpoint, compact):
        rebuilt, rebuilt_info = load_checkpoint(path)
        assert rebuilt_info == info
        assert not rebuilt.training
        with torch.no_grad():
            assert torch.equal(rebuilt(x), expected)
        for key, value in model.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), key
    from safetensors import safe_open

    with safe_open(str(compact), framework="pt") as handle:
        stored, metadata = set(handle.keys()), handle.metadata()
    assert metadata["format"] == COMPACT_FORMAT
    if arm == "csg-frozen":
        # The frozen generator is rebuilt from the seed: the compact file stores only the seed.
        assert GENERATOR_KEY not in stored and metadata["generator"] == "seed" and metadata["seed"] == "3"
    elif arm == "csg":
        assert GENERATOR_KEY in stored and metadata["generator"] == "stored"
        assert not any(key.endswith("conv1.weight") and key != "conv1.weight" for key in stored)  # no filters
    else:
        assert metadata["generator"] == "none"


def test_compact_is_smallest_for_csg_models(tmp_path: Path) -> None:
    sizes: dict[tuple[str, str], dict[str, int]] = {}
    for name in ("resnet20", "resnet56"):
        for arm in ("fedavg", "csg", "csg-frozen"):
            info = ModelSettings(model=name, arm=arm)
            model = info.build().eval()
            # Every arm materializes to the same plain network: its TorchScript/ONNX files differ only
            # in metadata, so the (slow) inference exports are made for the csg arm alone.
            formats = ("compact", "torchscript", "onnx") if arm == "csg" else ("compact",)
            sizes[name, arm] = {
                fmt: export_model(model, info, fmt, tmp_path / f"{name}-{arm}.{fmt}").stat().st_size for fmt in formats
            }
    for name in ("resnet20", "resnet56"):
        csg, frozen, plain = sizes[name, "csg"], sizes[name, "csg-frozen"], sizes[name, "fedavg"]
        assert frozen["compact"] < csg["compact"] < csg["onnx"] < csg["torchscript"], (name, sizes)
        # The inference files hold the plain network's float32 weights: about fedavg's compact file.
        assert abs(csg["onnx"] - plain["compact"]) < 0.02 * plain["compact"], (name, sizes)
    # Float32 tensors dominate: the compact csg-frozen ResNet-56 holds 67,138 parameters plus BN buffers.
    assert 67_138 * 4 < sizes["resnet56", "csg-frozen"]["compact"] < 67_138 * 4 + 60_000
    assert sizes["resnet56", "csg"]["compact"] < sizes["resnet56", "csg"]["onnx"] / 4


def test_torchscript_round_trip(tmp_path: Path) -> None:
    info = ModelSettings(model="resnet20", arm="csg")
    model = calibrated(info)
    path = export_model(model, info, "torchscript", tmp_path / "m.pt")
    module, metadata = load_torchscript(path)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-4)
    assert metadata["model"] == "resnet20" and metadata["arm"] == "csg" and json.loads(metadata["mean"])[0] == 0.4914
    assert not any("codes" in name for name, _ in module.named_parameters())  # materialized: plain convs


def test_onnx_matches_pytorch_on_cifar10_test_split(tmp_path: Path, data_env: Path) -> None:
    import onnx
    import onnxruntime as ort

    from fedcsg.data.batches import TensorBatches
    from fedcsg.data.readers import load_split

    info = ModelSettings(model="resnet20", arm="csg")
    # Statistics from real images, so predictions spread over classes like a trained model's would.
    train = load_split("cifar10", "train", limit=512, seed=0)
    model = info.build()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in TensorBatches(train, 128):
            model(x)
    model.eval()
    path = export_model(model, info, "onnx", tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["fedcsg.model"] == "resnet20" and props["fedcsg.arm"] == "csg"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = load_split("cifar10", "test", limit=2000, seed=0)
    agree = total = 0
    with torch.no_grad():
        for x, _ in TensorBatches(test, 500):
            ours = model(x).argmax(1).numpy()
            theirs = session.run(["logits"], {"input": x.numpy()})[0].argmax(1)
            agree += int((ours == theirs).sum())
            total += len(ours)
    assert total == 2000
    assert agree / total >= 0.999, f"ONNX agrees with PyTorch on {agree}/{total}"


def test_serverapp_payloads_and_run_directories(tmp_path: Path) -> None:
    """What the ServerApp leaves: RUN/state/ARM-round-NNNN.safetensors (the flat-packed global payload)
    named by RUN/state/ARM.json, beside RUN/arms/ARM.json; and the save_global_model hook."""
    from fedcsg.runs.checkpoint import save_checkpoint as save_run_checkpoint

    cfg = RunConfig(arm="csg-frozen", seed=5)
    info = cfg.model_settings()
    model = calibrated(info)
    record = model_payload(model, PayloadLayout.for_model(model, "flat"))
    run_dir = tmp_path / "run"
    state = save_run_checkpoint(
        run_dir, "csg-frozen", 2, record, num_rounds=cfg.num_rounds, rounds=[{"round": r} for r in range(3)],
        config=cfg.to_flower(), identity=cfg.identity(), strategy={},
    )  # fmt: skip
    payload_file = next(state.parent.glob("csg-frozen-round-*.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for source in (run_dir, payload_file):  # the run directory, or the payload file inside it
        rebuilt, rebuilt_info = load_checkpoint(source)
        assert rebuilt_info == info
        with torch.no_grad():
            assert torch.equal(rebuilt(x), expected)
    _, (onnx_file,) = export_checkpoint(run_dir, ["onnx"])
    assert onnx_file == run_dir / "export" / "csg-frozen.onnx" and onnx_file.is_file()
    # A payload with neither metadata nor a run directory around it cannot be placed.
    lone = tmp_path / "lone" / "payload.safetensors"
    lone.parent.mkdir()
    save_file({k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}, str(lone))
    with pytest.raises(ValueError, match="no fedcsg metadata"):
        load_checkpoint(lone)
    rebuilt, _ = load_checkpoint(lone, run_config=cfg.to_flower())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    # The ServerApp hook: the final global ArrayRecord straight to a self-describing checkpoint.
    arrays = ArrayRecord({k: Array(np.asarray(a.numpy())) for k, a in record.items()})
    saved = save_global_model(run_dir, cfg, arrays)
    assert saved == run_dir / "model.safetensors"
    again, again_info = load_checkpoint(saved)
    assert again_info == info
    with torch.no_grad():
        assert torch.equal(again(x), expected)


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    info = ModelSettings(model="resnet20", arm="csg-frozen")
    model = info.build()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint(junk)
    bare = tmp_path / "bare.safetensors"
    save_file(compact_tensors(model), str(bare))
    with pytest.raises(ValueError, match="no fedcsg metadata"):
        load_checkpoint(bare)
    # A stored frozen generator that its seed does not draw: the file contradicts its metadata.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[GENERATOR_KEY] = -state[GENERATOR_KEY]
    forged = tmp_path / "forged.safetensors"
    metadata = {"format": "fedcsg-checkpoint", **info.to_metadata(), DIGEST_KEY: tensors_digest(state)}
    save_file(state, str(forged), metadata=metadata)  # its digest vouches for the forged tensors
    with pytest.raises(ValueError, match="frozen generator"):
        load_checkpoint(forged)
    wrong = tmp_path / "wrong.safetensors"
    save_file(compact_tensors(model), str(wrong), metadata=ModelSettings(model="resnet56", arm="csg").to_metadata())
    with pytest.raises(ValueError):
        load_checkpoint(wrong)
    with pytest.raises(ValueError, match="unknown arm"):
        ModelSettings(model="resnet20", arm="fedprox")


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = ModelSettings(model="resnet20", arm="csg")
    checkpoint = save_checkpoint(calibrated(info), tmp_path / "ckpt.safetensors", info)
    assert _cli(["export", "--checkpoint", str(checkpoint), "--format", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files = {row["format"]: row for row in result["files"]}
    assert set(files) == {"compact", "torchscript", "onnx"}
    assert Path(files["onnx"]["path"]).name == "ckpt.onnx" and Path(files["torchscript"]["path"]).name == "ckpt.pt"
    assert files["compact"]["bytes"] < files["onnx"]["bytes"]
    for row in files.values():  # what `sha256sum FILE` prints on the device after copying it
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    out = tmp_path / "x" / "model.onnx"
    assert _cli(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(FileNotFoundError):
        _cli(["export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--format", "onnx"])
    with pytest.raises(SystemExit) as error:
        _cli(["export", "--checkpoint", str(checkpoint), "--format", "tflite"])
    assert error.value.code == 2


def test_compact_model_predicts_on_a_device_without_flower(tmp_path: Path, data_env: Path) -> None:
    """`fedcsg.deploy.on_device` in a fresh interpreter: loads the compact files of csg and
    csg-frozen ResNet-20 and predicts 500 CIFAR-10 test images (uint8, as stored) exactly as the
    model that wrote them, without ever importing flwr, ray, datasets or matplotlib."""
    import subprocess
    import sys

    from fedcsg.data.readers import load_split
    from fedcsg.deploy.on_device import predict

    test = load_split("cifar10", "test", limit=500, seed=0)
    np.save(tmp_path / "images.npy", test.images.numpy())
    expected = {}
    for arm in ("csg", "csg-frozen"):
        info = ModelSettings(model="resnet20", arm=arm)
        model = calibrated(info)
        export_model(model, info, "compact", tmp_path / f"{arm}.compact.safetensors")
        metadata = {"mean": json.dumps(list(test.spec.mean)), "std": json.dumps(list(test.spec.std))}
        expected[arm] = predict(model, test.images, metadata).tolist()
    assert len(set(expected["csg"])) > 1  # predictions spread over classes: a real comparison
    script = (
        "import json, resource, sys\n"
        "import numpy as np, torch\n"
        "from fedcsg.deploy.on_device import load_compact, predict\n"
        "images = torch.from_numpy(np.load(sys.argv[1]))\n"
        "out = {}\n"
        "for arm in ('csg', 'csg-frozen'):\n"
        "    model, info, metadata = load_compact(sys.argv[2] + '/' + arm + '.compact.safetensors')\n"
        "    out[arm] = predict(model, images, metadata).tolist()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'ray', 'datasets', 'matplotlib'})\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'predictions': out, 'heavy': heavy, 'peak_rss_mib': rss}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images.npy"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    print(f"on-device load + predict of 500 images, two models: peak RSS {result['peak_rss_mib']:.0f} MiB")
    assert result["heavy"] == []
    assert result["predictions"] == expected
