"""``fedcsg params`` and ``fedcsg bytes``: a model's parameter counts and the bytes of one round of
each arm, without training. Both build their models from the same settings (the model's own slice
when ``--slice`` is not given)."""

from __future__ import annotations

import argparse
import json

from fedcsg.cli.args import add_model_options, integer, positive_int, table
from fedcsg.nn.models import model_spec
from fedcsg.nn.params import count_parameters
from fedcsg.spec.arms import DOWNLINKS, all_arms, two_way_arms
from fedcsg.spec.config import RunConfig
from fedcsg.spec.settings import ModelSettings
from fedcsg.wire.payload import PACKINGS


def _dataset(model: str) -> str:
    """The data set a model is for: fmnist-cnn's 28x28 grayscale images, deeplabv3-small's
    fashion-mnist-seg canvases, the DeepLabV3-ResNets' Pascal VOC (21 classes), else CIFAR-10's."""
    if model == "deeplabv3-small":
        return "fashion-mnist-seg"
    if model.startswith("deeplabv3-"):
        return "voc"
    return "fashion-mnist" if model == "fmnist-cnn" else "cifar10"


def model_settings(args: argparse.Namespace, arm: str) -> ModelSettings:
    """The model that ``--model``, ``--slice``, ``--code-dim``, ``--pointwise-slice``, ``--num-classes``,
    ``--in-channels`` (and, where the command has it, ``--seed``) describe, as ``arm``; unset
    CSG settings are the model's own, unset shapes the model's own (resnet50: 1000 classes) or the data set's."""
    return ModelSettings(
        model=args.model,
        arm=arm,
        slice=args.slice_shape or "",
        code_dim=args.code_dim or 0,
        pointwise_slice=args.pointwise_slice or "",
        seed=getattr(args, "seed", 0),
        num_classes=args.num_classes or model_spec(args.model).num_classes,
        in_channels=args.in_channels or 0,
        dataset=_dataset(args.model),
    )


def cmd_params(args: argparse.Namespace) -> int:
    plain_settings = model_settings(args, "fedavg")
    csg_settings = model_settings(args, "csg-frozen" if args.frozen_generator else "csg")
    config = csg_settings.csg_config()
    assert config is not None
    plain = count_parameters(plain_settings.build())
    csg = count_parameters(csg_settings.build())
    result = {
        "model": args.model,
        "slices": [{"shape": str(s.shape), "code_dim": s.code_dim} for s in config.slices],
        "frozen_generator": config.frozen,
        "plain": plain.as_dict(),
        "csg": csg.as_dict(),
        "reduction": plain.total / csg.total,
        "sendable_reduction": plain.sendable / csg.sendable,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    slices = ", ".join(f"{s['shape']} / {s['code_dim']}" for s in result["slices"])
    kind = "frozen binary" if config.frozen else "trainable"
    print(f"{args.model}: CSG {slices}, {kind} generator")
    keys = ("total", "generator", "codes", "other", "buffers", "sendable")
    print("\n".join(table([("", "plain", "csg"), *((key, getattr(plain, key), getattr(csg, key)) for key in keys)])))
    print(f"reduction (total): {result['reduction']:.2f}x; reduction (sendable): {result['sendable_reduction']:.2f}x")
    return 0


def cmd_bytes(args: argparse.Namespace) -> int:
    from fedcsg.fl.traffic import arm_traffic

    cfg = RunConfig.for_model(
        model_settings(args, "csg"),
        payload_packing=args.packing,
        num_clients=args.clients_per_round,
        downlink=args.downlink,
        topk_fraction=args.topk_fraction,
    )
    arms = [*all_arms(), *two_way_arms()]
    # Each arm's model of --num-classes and --in-channels (a folder set's, found from its data).
    rows = [arm_traffic(cfg.replace(arm=arm), args.clients_per_round, model_settings(args, arm)) for arm in arms]
    base = rows[0]
    for row in rows:
        row["upload_ratio_vs_fedavg"] = base["wire_up"] / row["wire_up"]
        row["download_ratio_vs_fedavg"] = base["wire_down"] / row["wire_down"]
        row["total_ratio_vs_fedavg"] = (base["wire_up"] + base["wire_down"]) / (row["wire_up"] + row["wire_down"])
        row["payload_upload_ratio_vs_fedavg"] = base["payload_up"] / row["payload_up"]
    if args.json:
        print(
            json.dumps(
                {
                    "model": cfg.model,
                    "slice": cfg.slice,
                    "code_dim": cfg.code_dim,
                    "fedpara_ratio": cfg.fedpara_ratio,
                    "topk_fraction": cfg.topk_fraction,
                    "downlink": cfg.downlink,
                    "clients_per_round": args.clients_per_round,
                    "packing": cfg.payload_packing,
                    "arms": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{cfg.model}, csg slice {cfg.slice} / {cfg.code_dim}, fedpara-ratio {cfg.fedpara_ratio}, topk-fraction "
        f"{cfg.topk_fraction}, downlink {cfg.downlink}, {args.clients_per_round} clients per round, "
        f"{cfg.payload_packing} packing: bytes per round (an update of a non-zero step, really encoded; a delta "
        "downlink's in-sync message is the change between two broadcasts, its resync message x̂ in full, per client)"
    )
    header = ("arm", "down", "payload up", "payload down", "wire up", "wire down", "resync down/client")
    header += ("up vs fedavg", "total vs fedavg")
    cells = [
        (
            *(row[key] for key in ("arm", "downlink", "payload_up", "payload_down", "wire_up", "wire_down")),
            row["wire_down_resync_per_client"],
            f"{row['upload_ratio_vs_fedavg']:.2f}x",
            f"{row['total_ratio_vs_fedavg']:.2f}x",
        )
        for row in rows
    ]
    print("\n".join(table([header, *cells], left=2)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``params`` and ``bytes`` to the ``fedcsg`` parser's subparsers."""
    params = sub.add_parser("params", help="parameter counts of a model, plain and CSG")
    add_model_options(params)
    params.add_argument("--frozen-generator", action="store_true", help="the paper's random binary generator")
    params.set_defaults(handler=cmd_params)

    bytes_ = sub.add_parser("bytes", help="bytes per round of each arm, from real Flower messages (no training)")
    add_model_options(bytes_)
    bytes_.add_argument("--clients-per-round", type=positive_int, default=10)
    bytes_.add_argument("--packing", choices=PACKINGS, default="flat", help="payload packing (default: flat)")
    bytes_.add_argument(
        "--downlink", choices=DOWNLINKS, default="full", help="downlink of the arms that name none (default: full)"
    )
    bytes_.add_argument("--topk-fraction", type=float, default=RunConfig.topk_fraction, help="topk codec's fraction")
    bytes_.add_argument("--seed", type=integer, default=0)
    bytes_.set_defaults(handler=cmd_bytes)
