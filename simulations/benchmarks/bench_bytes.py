"""Bytes per federated round of each arm (fedavg, csg, csg-frozen), payload and wire, per packing.

For every model and slice setting this builds the real Flower train message and reply of each arm
offline (:func:`fedcsg.fl.traffic.arm_traffic`, no training) and reports, for ``--clients-per-round``
clients:

* parameters of the arm's model (total, and sendable: without a frozen generator);
* payload bytes (raw tensor bytes) and wire bytes (serialized Flower objects) up and down;
* the ratio fedavg / arm of payload and wire bytes (how many times fewer bytes the arm sends);
* the wire overhead ``wire / payload - 1`` in percent, for "flat" and "per-tensor" packing, of the
  initial model's messages and (``ovh rnd%``) of an upload whose tensors all hold distinct random
  values, as after training.

Target (PASS/FAIL per row): with flat packing, wire bytes are within ``--max-overhead`` percent
(default 3) of payload bytes for every arm, up, down and up with a distinct state. Per-tensor rows carry no target: they
show what one Array per state_dict entry costs (a header per tensor). Flower content-addresses
Arrays, so identical tensors in one message (freshly initialised BatchNorm buffers: all ones or
all zeros) travel once; the "dup" column counts them, and it is why per-tensor wire bytes can be
*below* the payload for an untrained model; ``ovh rnd%`` shows the per-tensor cost once trained.

The script also checks that flat packing round-trips exactly: for every model/slice/arm,
``PayloadLayout.unpack(PayloadLayout.pack(state))`` equals the state bit for bit, both for the
model's initial state and for a randomised state holding NaN, -0.0 and inf.

Usage::

    python3 -m simulations.benchmarks.bench_bytes
    python3 -m simulations.benchmarks.bench_bytes --models resnet56 --slices 12x12x3x3:72 --packing flat
    python3 -m simulations.benchmarks.bench_bytes --clients-per-round 100 --json /tmp/bytes.json

Exit status: 0 when every flat row passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flwr
import torch
from flwr.app import Message, RecordDict

from fedcsg.fl.task import build_arm_model
from fedcsg.fl.traffic import arm_traffic, payload_bytes, round_messages, wire_bytes
from fedcsg.nn.csg import SliceShape, generators
from fedcsg.nn.models import default_code_dim
from fedcsg.nn.params import count_parameters
from fedcsg.runs.records import versions
from fedcsg.spec.arms import MODELS, PHASED
from fedcsg.spec.config import RunConfig
from fedcsg.wire.payload import PACKINGS, PayloadLayout
from simulations.benchlib import RESULTS, parse_models, write_json


def parse_slices(text: str) -> list[tuple[str, int]]:
    """``"12x12x3x3:72,16x16x3x3"`` -> ``[("12x12x3x3", 72), ("16x16x3x3", 128)]`` (code dim
    defaults to slice numel / 18)."""
    result = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        shape_text, _, dim_text = item.partition(":")
        shape = SliceShape.parse(shape_text)
        try:
            code_dim = int(dim_text) if dim_text.strip() else default_code_dim(shape)
        except ValueError:
            raise argparse.ArgumentTypeError(f"code dim of {item!r} is not an integer") from None
        if code_dim <= 0:
            raise argparse.ArgumentTypeError(f"code dim of {item!r} must be positive")
        result.append((str(shape), code_dim))
    if not result:
        raise argparse.ArgumentTypeError("no slice setting given")
    return result


def build_parser() -> argparse.ArgumentParser:
    models = "resnet20,resnet32,resnet56,resnet110,densenet40,mobilenetv2,shufflenetv2"
    slices = "12x12x3x3:72,16x16x3x3:128"
    json_path = RESULTS / "bench_bytes.json"
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", type=parse_models, default=models, help="comma-separated registry models")
    parser.add_argument(
        "--slices", type=parse_slices, default=slices, help="comma-separated SHAPE[:CODE_DIM] slice settings"
    )
    parser.add_argument("--clients-per-round", type=int, default=10, help="clients per round")
    parser.add_argument("--packing", choices=(*PACKINGS, "both"), default="both", help="payload packing(s)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--max-overhead", type=float, default=3.0, help="target: max |flat wire overhead| in percent")
    parser.add_argument("--json", type=Path, default=json_path, help="JSON output")
    return parser


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with random values (and NaN, -0.0, inf in the first float tensor)."""
    rng = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    specials_done = False
    for key, value in state.items():
        if value.is_floating_point():
            new = torch.randn(value.shape, generator=rng, dtype=value.dtype)
            if not specials_done and new.numel() >= 3:
                flat = new.view(-1)
                flat[0], flat[1], flat[2] = float("nan"), -0.0, float("inf")
                specials_done = True
        else:
            new = torch.randint(-(2**31), 2**31, value.shape, generator=rng).to(value.dtype)
        out[key] = new
    return out


def check_round_trip(model: torch.nn.Module, packing: str, seed: int) -> int:
    """Assert that unpack(pack(state)) is bit-exact; returns the number of entries checked."""
    layout = PayloadLayout.for_model(model, packing)
    checked = 0
    for state in (model.state_dict(), _randomised(model.state_dict(), seed)):
        back = layout.unpack(layout.pack(state))
        assert set(back) == set(layout.keys) and len(back) == len(layout.keys), f"{packing} round trip changed keys"
        for entry in layout.entries:
            original, restored = state[entry.key], back[entry.key]
            assert restored.dtype == original.dtype, f"{entry.key}: dtype {restored.dtype} != {original.dtype}"
            assert tuple(restored.shape) == tuple(original.shape), f"{entry.key}: shape changed"
            assert _tensor_bytes(restored) == _tensor_bytes(original), f"{entry.key}: bits changed"
            checked += 1
    return checked


def duplicate_arrays(model: torch.nn.Module, packing: str) -> int:
    """Arrays of the packed payload whose content equals an earlier one (sent once by Flower)."""
    record = PayloadLayout.for_model(model, packing).pack(model.state_dict())
    seen = set()
    for array in record.values():
        seen.add(hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.data).hexdigest())
    return len(record) - len(seen)


def randomised_wire_up(cfg: RunConfig, model: torch.nn.Module) -> tuple[int, int]:
    """(payload, wire) bytes of one client's reply whose tensors all hold distinct random values,
    as after training (no two BatchNorm buffers alike, so content addressing saves nothing)."""
    down, up = round_messages(cfg)
    layout = PayloadLayout.for_model(model, cfg.payload_packing)
    arrays = layout.pack(_randomised(model.state_dict(), cfg.seed + 1))
    reply = Message(RecordDict({"arrays": arrays, "metrics": up.content["metrics"]}), reply_to=down)
    return payload_bytes(arrays), wire_bytes(reply)


def measure(models: list[str], slices: list[tuple[str, int]], packings: list[str], clients: int, seed: int) -> dict:
    rows: list[dict] = []
    round_trips = payloads = 0
    for model_name in models:
        for slice_text, code_dim in slices:
            for packing in packings:
                base = None
                for arm in (m for m in MODELS if m not in PHASED):  # one payload every round
                    cfg = RunConfig(
                        model=model_name,
                        slice=slice_text,
                        code_dim=code_dim,
                        arm=arm,
                        payload_packing=packing,
                        num_clients=clients,
                        seed=seed,
                    )
                    traffic = arm_traffic(cfg, clients)
                    model = build_arm_model(cfg)
                    counts = count_parameters(model)
                    assert counts.sendable == traffic["parameters_sendable"]
                    if packing == "flat":
                        round_trips += check_round_trip(model, packing, seed)
                        payloads += 1
                    row = {
                        "model": model_name,
                        "slice": slice_text,
                        "code_dim": code_dim,
                        "generators": [f"{g.shape}/{g.code_dim}" for g in generators(model).values()],
                        "packing": packing,
                        "arm": arm,
                        "parameters_total": counts.total,
                        "parameters_sendable": counts.sendable,
                        "tensors": traffic["tensors"],
                        "arrays_per_message": traffic["arrays_per_message"],
                        "duplicate_arrays": duplicate_arrays(model, packing),
                        **{k: traffic[k] for k in ("payload_up", "payload_down", "wire_up", "wire_down")},
                    }
                    payload_rnd, wire_rnd = randomised_wire_up(cfg, model)
                    assert payload_rnd * clients == row["payload_up"]
                    row["wire_up_distinct"] = wire_rnd * clients
                    row["wire_overhead_up_distinct_percent"] = 100.0 * (wire_rnd / payload_rnd - 1.0)
                    base = base or row
                    for direction in ("up", "down"):
                        payload, wire = row[f"payload_{direction}"], row[f"wire_{direction}"]
                        row[f"payload_ratio_{direction}"] = base[f"payload_{direction}"] / payload
                        row[f"wire_ratio_{direction}"] = base[f"wire_{direction}"] / wire
                        row[f"wire_overhead_{direction}_percent"] = 100.0 * (wire / payload - 1.0)
                    rows.append(row)
    return {"rows": rows, "round_trip_entries_checked": round_trips, "round_trip_payloads": payloads}


def print_table(rows: list[dict], max_overhead: float) -> None:
    columns = (
        ("model", 13, "s"),
        ("slice", 15, "s"),
        ("generators", 16, "s"),
        ("packing", 11, "s"),
        ("arm", 11, "s"),
        ("params total", 13, ","),
        ("sendable", 11, ","),
        ("arrays", 7, ","),
        ("dup", 4, ","),
        ("payload up", 13, ","),
        ("wire up", 13, ","),
        ("wire down", 13, ","),
        ("x payload", 10, ".2f"),
        ("x wire up", 10, ".2f"),
        ("x wire dn", 10, ".2f"),
        ("ovh up%", 8, "+.3f"),
        ("ovh dn%", 8, "+.3f"),
        ("ovh rnd%", 9, "+.3f"),
        ("target", 7, "s"),
    )
    print("".join(f"{name:>{width}}" for name, width, _ in columns))
    for row in rows:
        values = (
            row["model"],
            f"{row['slice']}/{row['code_dim']}",
            "+".join(row["generators"]) or "-",
            row["packing"],
            row["arm"],
            row["parameters_total"],
            row["parameters_sendable"],
            row["arrays_per_message"],
            row["duplicate_arrays"],
            row["payload_up"],
            row["wire_up"],
            row["wire_down"],
            row["payload_ratio_up"],
            row["wire_ratio_up"],
            row["wire_ratio_down"],
            row["wire_overhead_up_percent"],
            row["wire_overhead_down_percent"],
            row["wire_overhead_up_distinct_percent"],
            {True: "PASS", False: "FAIL", None: "-"}[row["target_pass"]],
        )
        print("".join(f"{format(value, fmt):>{width}}" for value, (_, width, fmt) in zip(values, columns, strict=True)))
    print(
        "slice = requested setting; generators = those the CSG model has (a model without dense 3x3 convs "
        "besides the stem has no 3x3 generator; MobileNetV2/ShuffleNetV2 add the paper's 1x1 one)\n"
        f"bytes per round; x = fedavg bytes / arm bytes; ovh = wire / payload - 1 (rnd: upload of a state whose "
        f"tensors all differ, as after training); target: flat packing within {max_overhead:g}% in all three "
        "(per-tensor: no target); dup = arrays equal to an earlier one in the initial message (content-addressed, "
        "sent once)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients_per_round <= 0:
        raise SystemExit("--clients-per-round must be positive")
    packings = list(PACKINGS) if args.packing == "both" else [args.packing]
    start = time.perf_counter()
    result = measure(args.models, args.slices, packings, args.clients_per_round, args.seed)
    rows = result["rows"]
    for row in rows:
        if row["packing"] == "flat":
            worst = max(abs(row[f"wire_overhead_{key}_percent"]) for key in ("up", "down", "up_distinct"))
            row["target_pass"] = bool(worst <= args.max_overhead)
        else:
            row["target_pass"] = None
    print(f"{args.clients_per_round} clients per round, seed {args.seed}, flwr {flwr.__version__}")
    print_table(rows, args.max_overhead)
    flat_rows = [r for r in rows if r["target_pass"] is not None]
    all_pass = all(r["target_pass"] for r in flat_rows)
    if "flat" in packings:
        print(
            f"round trip exact: flat unpack(pack(state)) bit for bit, {result['round_trip_payloads']} "
            f"model/slice/arm payloads ({result['round_trip_entries_checked']} tensors, initial and randomised states)"
        )
        print(
            f"target flat wire overhead <= {args.max_overhead:g}%: "
            f"{'PASS' if all_pass else 'FAIL'} ({sum(r['target_pass'] for r in flat_rows)}/{len(flat_rows)} rows)"
        )
    report = {
        "benchmark": "bytes",
        "clients_per_round": args.clients_per_round,
        "seed": args.seed,
        "packings": packings,
        "max_overhead_percent": args.max_overhead,
        "round_trip_exact": "flat" in packings,
        "round_trip_payloads": result["round_trip_payloads"],
        "round_trip_entries_checked": result["round_trip_entries_checked"],
        "all_pass": all_pass,
        "versions": versions(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_json(args.json, report)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
