"""The ``fedcsg`` command line: params, bytes, run, compare, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from fedcsg.models import MODELS, build_model, default_csg_config
from fedcsg.params import count_parameters


class OneLineParser(argparse.ArgumentParser):
    """Argument errors on one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (a positive integer is accepted)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive (a positive integer is accepted)")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"registry model: {', '.join(MODELS)}, densenet40-kN")
    parser.add_argument("--slice", dest="slice_shape", help="slice shape OUTxINxKxK (default: the model's, 12x12x3x3)")
    parser.add_argument("--code-dim", type=_positive_int, help="code dimension (default: slice numel / 18)")
    parser.add_argument("--pointwise-slice", help="also generate 1x1 convs with this slice, e.g. 16x16x1x1")
    parser.add_argument("--num-classes", type=_positive_int, default=10)
    parser.add_argument("--in-channels", type=_positive_int, default=None, help="default: 1 for fmnist-cnn, else 3")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _in_channels(args: argparse.Namespace) -> int:
    return args.in_channels or (1 if args.model == "fmnist-cnn" else 3)


def cmd_params(args: argparse.Namespace) -> int:
    config = default_csg_config(
        args.model,
        args.slice_shape,
        args.code_dim,
        frozen=args.frozen_generator,
        pointwise_slice=args.pointwise_slice,
    )
    in_channels = _in_channels(args)
    plain = count_parameters(build_model(args.model, args.num_classes, in_channels))
    csg = count_parameters(build_model(args.model, args.num_classes, in_channels, csg=config))
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
    print(f"{'':<12}{'plain':>12}{'csg':>12}")
    for key in ("total", "generator", "codes", "other", "buffers", "sendable"):
        print(f"{key:<12}{getattr(plain, key):>12,}{getattr(csg, key):>12,}")
    print(f"reduction (total): {result['reduction']:.2f}x; reduction (sendable): {result['sendable_reduction']:.2f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedcsg", description="Federated learning with CSG-backed CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="parameter counts of a model, plain and CSG")
    _add_model_options(params)
    params.add_argument("--frozen-generator", action="store_true", help="the paper's random binary generator")
    params.set_defaults(handler=cmd_params)

    from fedcsg import commands  # the federated workflows; imported here to keep `params` light

    commands.register(sub, _add_model_options, _positive_int)

    from fedcsg import deploy_cli  # deployment (certificates, SuperLink/SuperNodes) and model export

    deploy_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"fedcsg {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
