"""Issue 25 diagnostic: the filter step of a finished run, per layer.

For every arm of a run directory (one seed: ``DIR`` holds ``arms/``; for a run over seeds pass
``DIR/seed-N``) this prints

- the per-round filter step the server recorded (``filter_step``: the global filters' relative change
  over the round; ``client_filter_step``: the mean over the round's clients of a client's change in
  its local training), and
- per layer, the relative change ``|W_last - W_0| / |W_0|`` of the global conv filters from the
  initial model (rebuilt from the recorded config and seed, as every party builds it) to the global
  model of the last checkpointed round (``DIR/state/``); generated filters for CSG layers, FedPara's
  products, plain weights,

and writes both as JSON. (How far one local epoch moves each layer from the same filters, plain vs CSG
variants, is ``simulations/csg_step.py``.)

Usage::

    PYTHONPATH=. python3 simulations/filter_step_layers.py RUN_DIR [OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedcsg.fl.filter_step import PayloadFilters
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.nn.step import relative_change
from fedcsg.nn.training import set_seed
from fedcsg.runs.checkpoint import load_checkpoint
from fedcsg.runs.layout import arm_record_files
from fedcsg.runs.records import read_arm_record
from fedcsg.spec.config import RunConfig
from fedcsg.wire.payload import model_payload


def arm_layers(run_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The per-round steps of one arm's record and its per-layer change from round 0 to the last checkpoint."""
    known = RunConfig().to_flower()
    cfg = RunConfig.from_mapping({k: v for k, v in document["config"].items() if k in known})
    set_seed(cfg.seed)  # as the ServerApp builds it (fedcsg.fl.server_app.run_federation)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    filters = PayloadFilters(model, layout)
    checkpoint = load_checkpoint(run_dir, cfg.arm, layout)
    rounds = [
        {key: r.get(key) for key in ("round", "filter_step", "client_filter_step", "test_accuracy")}
        for r in document["rounds"]
    ]
    result: dict[str, Any] = {"arm": cfg.arm, "rounds": rounds, "last_round": None, "per_layer": {}, "overall": None}
    if checkpoint is None:
        return result
    step = relative_change(filters(model_payload(model, layout)), filters(checkpoint.arrays))
    return {**result, "last_round": checkpoint.round, "per_layer": step.per_layer, "overall": step.overall}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(run_dir: Path, out: Path | None) -> dict[str, Any]:
    if not (run_dir / "arms").is_dir():
        raise SystemExit(
            f"{str(run_dir)!r} holds no arms/: accepted is a run directory of one seed (DIR or DIR/seed-N)"
        )
    arms = {}
    for path in arm_record_files(run_dir):
        document = read_arm_record(path)
        result = arm_layers(run_dir, document)
        arms[result["arm"]] = result
    names = list(arms)
    print("Filter step per round (global / client mean):\n")
    print("| round | " + " | ".join(names) + " |")
    print("| ---: |" + " ---: |" * len(names))
    for i in range(max(len(a["rounds"]) for a in arms.values())):
        cells = [
            f"{_cell(a['rounds'][i]['filter_step'])} / {_cell(a['rounds'][i]['client_filter_step'])}"
            if i < len(a["rounds"])
            else ""
            for a in arms.values()
        ]
        print(f"| {i} | " + " | ".join(cells) + " |")
    layers = list(dict.fromkeys(layer for a in arms.values() for layer in a["per_layer"]))
    lasts = ", ".join(f"{arm} {a['last_round']}" for arm, a in arms.items())
    print(f"\nGlobal filters' relative change per layer, round 0 to the last checkpoint ({lasts}):\n")
    print("| layer | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    print("| **overall** | " + " | ".join(f"**{_cell(a['overall'])}**" for a in arms.values()) + " |")
    for layer in layers:
        print(f"| {layer} | " + " | ".join(_cell(a["per_layer"].get(layer)) for a in arms.values()) + " |")
    document = {"run_dir": str(run_dir), "arms": arms}
    if out is not None:
        out.write_text(json.dumps(document, indent=1) + "\n")
        print(f"\nwrote {out}")
    return document


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
