"""How much of central DP's noise reaches the conv filters, per arm: the filter-space gain.

Central DP adds noise of one std, ``sigma * C / n``, to every coordinate an arm sends. A coordinate of
fedavg is a filter weight; a code of csg feeds a whole slice through the generator, and FedPara's
factors multiply. This study adds Gaussian noise of std ``s`` to every trained coordinate of each
arm's model (its parameters; BatchNorm's running statistics are left out) and measures the std of the
change of each conv's filters (generated filters for CSG layers, the factors' product for FedPara's),
divided by ``s``: the gain. A gain of 1 is fedavg's; above 1, the same noise per coordinate moves the
filters more. The last column sets the noise that reaches the filters in one round of the DP
experiment (``s = sigma * C / clients-per-round`` from the config) beside the filters' own std.
The models are fresh from the config's seed; the gain of a trained csg generator or FedPara's
factors moves with training (``--weights`` reads a trained model of one arm instead).

Usage::

    python3 -m simulations.studies.dp_noise_gain                           # fmnist-cnn-dp-cross-device
    python3 -m simulations.studies.dp_noise_gain --json docs/privacy/noise-gain.json
    python3 -m simulations.studies.dp_noise_gain --arms csg-frozen --weights runs/dp/seed-0/model-csg-frozen.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedcsg.nn.csg import frozen_generator_keys
from fedcsg.nn.step import conv_filters
from fedcsg.runs.weights import load_state, read_safetensors
from fedcsg.spec.experiments import load_experiment
from simulations.benchlib import print_table

ARMS = ("fedavg", "fedpara", "csg", "csg-frozen")


@torch.no_grad()
def filter_gain(model: torch.nn.Module, scale: float, trials: int, seed: int) -> dict[str, float]:
    """Conv name -> std of the filters' change per unit of noise std on every trained coordinate."""
    before = conv_filters(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trained]
    generator = torch.Generator().manual_seed(seed)
    squares = {name: 0.0 for name in before}
    for _ in range(trials):
        for p, p0 in zip(trained, saved, strict=True):
            p.copy_(p0 + scale * torch.randn(p0.shape, generator=generator))
        after = conv_filters(model)
        for name in before:
            squares[name] += float((after[name] - before[name]).pow(2).mean())
    for p, p0 in zip(trained, saved, strict=True):
        p.copy_(p0)
    return {name: (total / trials) ** 0.5 / scale for name, total in squares.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fmnist-cnn-dp-cross-device")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--weights", type=Path, help="a trained model of the (one) arm, as a run saves it")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    base = load_experiment(args.config)
    arms = args.arms.split(",")
    if args.weights and len(arms) != 1:
        parser.error(f"--weights {args.weights} needs exactly one arm in --arms, got {args.arms!r}")
    rows, records = [], []
    for arm in arms:
        cfg = base.replace(arm=arm)
        model = cfg.model_settings().build()
        if args.weights:
            load_state(model, read_safetensors(args.weights)[0], frozen_generator_keys(model), args.weights)
        noise = cfg.dp_noise_multiplier * cfg.dp_clipping_norm / cfg.clients_per_round
        gains = filter_gain(model, 1e-3, args.trials, cfg.seed)
        filters = conv_filters(model)
        for name, gain in gains.items():
            own = float(filters[name].std())
            rows.append(
                [arm, name, tuple(filters[name].shape), f"{gain:.3f}", f"{own:.4f}", f"{gain * noise / own:.3f}"]
            )
            records.append(
                {"arm": arm, "layer": name, "gain": gain, "filter_std": own, "round_noise_over_std": gain * noise / own}
            )
    print_table(["arm", "conv", "shape", "gain", "filter std", "one round's noise / filter std"], rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"config": args.config, "weights": str(args.weights or ""), "layers": records}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
