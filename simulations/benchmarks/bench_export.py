"""Model files for devices: sizes of each export format, and whether the exports predict what PyTorch does.

1. Sizes: for each model and arm, the bytes of the checkpoint (whole ``state_dict``), the ``compact``
   file (generator or its seed, codes, ordinary layers), and the ``torchscript`` and ``onnx`` files of
   the materialized plain model (:mod:`fedcsg.deploy.export`). Sizes do not depend on training.
2. Agreement: a ResNet-20 of ``--arm`` trained for ``--epochs`` on ``--train-images`` CIFAR-10 images
   (one process, a few minutes on a CPU), exported, then run on the whole CIFAR-10 test split by
   PyTorch (the CSG model itself), onnxruntime (the ONNX file) and TorchScript: top-1 agreement with
   PyTorch, the largest logit difference, each one's accuracy, and milliseconds per image with one
   thread (batch 1 and batch 256).

Usage::

    FEDCSG_DATA_DIR=/work/shared/data python3 -m simulations.benchmarks.bench_export
    python3 -m simulations.benchmarks.bench_export --models resnet20 --train-images 2000 --test-limit 2000

Writes ``simulations/results/bench_export.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedcsg.deploy.export import EXPORT_FORMATS, export_model, load_torchscript
from fedcsg.runs.model_file import save_checkpoint
from fedcsg.spec.settings import ModelSettings
from simulations.benchlib import RESULTS, parse_models, write_json


def sizes(models: list[str], work: Path) -> list[dict]:
    rows = []
    for name in models:
        for arm in ("fedavg", "csg", "csg-frozen"):
            info = ModelSettings(model=name, arm=arm)
            model = info.build().eval()
            row = {
                "model": name,
                "arm": arm,
                "checkpoint": save_checkpoint(model, work / f"{name}-{arm}.safetensors", info).stat().st_size,
            }
            for fmt in EXPORT_FORMATS:
                row[fmt] = export_model(model, info, fmt, work / f"{name}-{arm}.{fmt}").stat().st_size
            rows.append(row)
            print(
                f"{name:<10}{arm:<12}{row['checkpoint']:>12,}{row['compact']:>12,}{row['torchscript']:>13,}"
                f"{row['onnx']:>12,}",
                flush=True,
            )
    return rows


def _ms_per_image(run, x: torch.Tensor, repeats: int) -> float:
    run(x)  # warm-up: first-call allocation and graph set-up are not what a device pays per image
    started = time.perf_counter()
    for _ in range(repeats):
        run(x)
    return (time.perf_counter() - started) / (repeats * x.shape[0]) * 1000


def agreement(args: argparse.Namespace, work: Path) -> dict:
    import onnxruntime as ort

    from fedcsg.data.batches import TensorBatches
    from fedcsg.data.readers import load_split
    from fedcsg.fl.task import build_arm_model, local_train
    from fedcsg.spec.config import RunConfig

    torch.set_num_threads(args.threads)
    cfg = RunConfig(arm=args.arm, model="resnet20", device="cpu", data_dir=args.data_dir, seed=0)
    model = build_arm_model(cfg)
    train = load_split("cifar10", "train", args.data_dir, limit=args.train_images, seed=0)
    started = time.perf_counter()
    stats = local_train(
        model, train, cfg, lr=0.05, epochs=args.epochs, batch_size=64, seed=0, device=torch.device("cpu")
    )
    train_seconds = time.perf_counter() - started
    model.eval()
    info = cfg.model_settings()
    onnx_path = export_model(model, info, "onnx", work / "trained.onnx")
    ts_path = export_model(model, info, "torchscript", work / "trained.pt")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    scripted, _ = load_torchscript(ts_path)
    test = load_split("cifar10", "test", args.data_dir, limit=args.test_limit or None, seed=0)
    counts = {"onnx_agree": 0, "torchscript_agree": 0, "pytorch_correct": 0, "onnx_correct": 0, "ts_correct": 0}
    max_diff = {"onnx": 0.0, "torchscript": 0.0}
    max_logit = 0.0
    total = 0
    first: torch.Tensor | None = None
    with torch.no_grad():
        for x, y in TensorBatches(test, 256):
            first = x if first is None else first
            ours = model(x)
            theirs = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
            traced = scripted(x)
            p, o, t = ours.argmax(1), theirs.argmax(1), traced.argmax(1)
            counts["onnx_agree"] += int((p == o).sum())
            counts["torchscript_agree"] += int((p == t).sum())
            counts["pytorch_correct"] += int((p == y).sum())
            counts["onnx_correct"] += int((o == y).sum())
            counts["ts_correct"] += int((t == y).sum())
            max_diff["onnx"] = max(max_diff["onnx"], float((ours - theirs).abs().max()))
            max_diff["torchscript"] = max(max_diff["torchscript"], float((ours - traced).abs().max()))
            max_logit = max(max_logit, float(ours.abs().max()))
            total += len(y)
        assert first is not None
        one, batch = first[:1], first  # a full batch: the split's last one may be short
        speed = {
            "pytorch_csg_ms_batch1": _ms_per_image(model, one, 50),
            "onnxruntime_ms_batch1": _ms_per_image(lambda v: session.run(None, {"input": v.numpy()}), one, 50),
            "torchscript_ms_batch1": _ms_per_image(scripted, one, 50),
            "pytorch_csg_ms_batch": _ms_per_image(model, batch, 3),
            "onnxruntime_ms_batch": _ms_per_image(lambda v: session.run(None, {"input": v.numpy()}), batch, 3),
            "torchscript_ms_batch": _ms_per_image(scripted, batch, 3),
        }
    result = {
        "arm": args.arm,
        "train_images": len(train),
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "train_loss": stats.loss,
        "test_images": total,
        "onnx_agreement": counts["onnx_agree"] / total,
        "torchscript_agreement": counts["torchscript_agree"] / total,
        "pytorch_accuracy": counts["pytorch_correct"] / total,
        "onnx_accuracy": counts["onnx_correct"] / total,
        "torchscript_accuracy": counts["ts_correct"] / total,
        "max_abs_logit_difference": max_diff,
        "max_abs_logit": max_logit,
        "threads": args.threads,
        "batch": int(batch.shape[0]),
        "ms_per_image": {k: round(v, 3) for k, v in speed.items()},
    }
    print(
        f"ResNet-20 ({args.arm}, {args.epochs} epoch(s) on {len(train):,} images): on {total:,} test images "
        f"ONNX agrees with PyTorch on {result['onnx_agreement']:.4%}, TorchScript on "
        f"{result['torchscript_agreement']:.4%}; max |logit diff| ONNX {max_diff['onnx']:.2e}, "
        f"TorchScript {max_diff['torchscript']:.2e} (largest |logit| {max_logit:.1f}); "
        f"accuracy PyTorch {result['pytorch_accuracy']:.4f}, "
        f"ONNX {result['onnx_accuracy']:.4f}"
    )
    print("ms per image, 1 thread: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ms_per_image"].items()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=parse_models, default="resnet20,resnet56", help="comma-separated models")
    parser.add_argument("--arm", default="csg", help="arm of the trained model of the agreement check")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--test-limit", type=int, default=0, help="0 = the whole test split (10,000 images)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("FEDCSG_DATA_DIR", ""))
    parser.add_argument("--json", default=str(RESULTS / "bench_export.json"))
    args = parser.parse_args(argv)
    if not args.data_dir and not args.skip_agreement:
        parser.error("no data: pass --data-dir or set FEDCSG_DATA_DIR (or --skip-agreement)")
    with tempfile.TemporaryDirectory(prefix="fedcsg-export-") as tmp:
        work = Path(tmp)
        print(f"{'model':<10}{'arm':<12}{'checkpoint':>12}{'compact':>12}{'torchscript':>13}{'onnx':>12}")
        size_rows = sizes(args.models, work)
        check = None if args.skip_agreement else agreement(args, work)
    import onnx
    import onnxruntime

    document = {
        "benchmark": "bench_export",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "sizes": size_rows,
        "agreement": check,
    }
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
