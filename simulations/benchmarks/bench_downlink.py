"""The int8 downlink's block size, measured on real ResNet payloads, and what a delta downlink's x̂
costs in ``Context.state``.

Part 1: for each model and arm (the global payload of the initial model, Kaiming init, BatchNorm
statistics at their start values) and each block size (0 = one scale per state-dict entry, the
per-tensor scale of the int8 uplink), the blockwise int8 encoding of the payload's float entries
(:func:`fedcsg.spec.codecs.int8_quantize`, round to nearest) is decoded and compared:

* ``rel l2``: ``||Q(x) - x|| / ||x||`` over all float entries;
* ``worst rel``: the largest per-entry ``||Q(x_e) - x_e|| / ||x_e||`` over the state-dict entries
  (a tensor whose values are tiny beside its block's peak is the one that suffers);
* ``bytes``: int8 values and float32 scales, and their share of the float32 payload.

Part 2: ``--state-clients N`` puts the x̂ of a delta downlink into N fresh ``Context`` objects as
:func:`fedcsg.wire.downlink.receive` does on a resync, and reports the resident memory that took in
this process (``/proc/self/statm``) beside the arithmetic N x payload bytes.

Usage::

    python3 -m simulations.benchmarks.bench_downlink
    python3 -m simulations.benchmarks.bench_downlink --models resnet20 --arms csg --state-clients 100
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.spec.codecs import block_lengths, int8_dequantize, int8_quantize
from fedcsg.spec.config import RunConfig
from fedcsg.wire.downlink import Broadcaster, Downlink, receive
from fedcsg.wire.payload import flat_floats, model_payload

BLOCKS = (0, 64, 128, 256, 1024, 4096)


def block_rows(model: str, arm: str) -> list[dict]:
    cfg = RunConfig(model=model, arm=arm)
    net = build_arm_model(cfg)
    layout = payload_layout(cfg, net)
    values = flat_floats(model_payload(net, layout), layout)
    segments = [e.numel for e in layout.floating]
    bounds = np.cumsum([0, *segments])
    rows = []
    for block in BLOCKS:
        blocks = block_lengths(segments, block)
        back = int8_dequantize(int8_quantize(values, blocks), blocks)
        error = back - values
        per_entry = [
            np.linalg.norm(error[a:b]) / max(np.linalg.norm(values[a:b]), 1e-30)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if np.linalg.norm(values[a:b]) > 0
        ]
        size = values.size + 4 * len(blocks)
        rows.append(
            {
                "model": model,
                "arm": arm,
                "block": block or "per-tensor",
                "rel_l2": float(np.linalg.norm(error) / np.linalg.norm(values)),
                "worst_rel": float(max(per_entry)),
                "bytes": size,
                "share": size / (4 * values.size),
            }
        )
    return rows


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_memory(model: str, arm: str, clients: int) -> dict:
    cfg = RunConfig(model=model, arm=f"{arm}/delta-int8")
    net = build_arm_model(cfg)
    layout = payload_layout(cfg, net)
    broadcaster = Broadcaster(Downlink.of_config(cfg, layout))
    broadcaster.prepare(model_payload(net, layout))
    group = broadcaster.groups([1])[0]
    before = rss_bytes()
    contexts = []
    for node in range(clients):
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        # Each node's message arrives as its own copy (deserialized), so each state holds its own x̂.
        record = ArrayRecord({k: Array(a.numpy().copy()) for k, a in group.record.items()})
        receive(broadcaster.downlink, record, group.sync, context.state)
        contexts.append(context)
    grown = rss_bytes() - before
    return {"clients": clients, "payload_bytes": layout.nbytes, "arithmetic": clients * layout.nbytes, "rss": grown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--arms", default="fedavg,csg")
    parser.add_argument("--state-clients", type=int, default=0, help="measure x̂ in N Contexts (0: skip)")
    args = parser.parse_args(argv)
    print(f"{'model':>9}{'arm':>8}{'block':>11}{'rel l2':>11}{'worst rel':>11}{'bytes':>12}{'of fp32':>9}")
    for model in args.models.split(","):
        for arm in args.arms.split(","):
            for r in block_rows(model, arm):
                print(
                    f"{r['model']:>9}{r['arm']:>8}{r['block']!s:>11}{r['rel_l2']:>11.2e}{r['worst_rel']:>11.2e}"
                    f"{r['bytes']:>12,}{r['share']:>9.2%}"
                )
    if args.state_clients:
        model, arm = args.models.split(",")[0], args.arms.split(",")[-1]
        m = state_memory(model, arm, args.state_clients)
        print(
            f"Context.state x̂ of {model} {arm}, {m['clients']} clients: {m['arithmetic'] / 1e6:.1f} MB by arithmetic "
            f"({m['payload_bytes']:,} B each), {m['rss'] / 1e6:.1f} MB resident measured"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
