"""The typed arm summary (fedcsg.runs.summary): one path for a one-seed run and a run over seeds, every
figure a Spread over the seeds, checked to the byte on constructed records (no Ray, no files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedcsg.runs.records import ArmRecorder
from fedcsg.runs.report import report_summary
from fedcsg.runs.summary import Spread, summarize, summary_records

from .records import round_record

CONFIG = {"target-accuracy": 0.3}


def _arm(arm: str, accuracies: list[float], up: int, down: int, **fields: Any) -> dict[str, Any]:
    """One seed's results entry of ``arm``: a round per accuracy (round 0 first), ``up`` / ``down`` wire
    and payload bytes a round; ``fields`` (lists: per trained round) are added to the trained rounds."""
    recorder = ArmRecorder(Path("unused"), arm, {"arm": arm})
    for rnd, accuracy in enumerate(accuracies):
        extra = {key: values[rnd - 1] for key, values in fields.items()} if rnd else {}
        recorder.add(round_record(rnd, accuracy, up=up, down=down, **extra), save=False)
    return {"config": {"arm": arm}, "rounds": recorder.rounds}


def _seeds() -> dict[int, dict[str, Any]]:
    """Two seeds: fedavg and csg in both (csg under DP, with an epsilon per round), fedpara in seed 0 only."""
    seed_0 = {
        "fedavg": _arm("fedavg", [0.1, 0.2, 0.35, 0.40], 100, 200, devices=[["cpu", "cuda:0 X"]] * 3),
        "csg": _arm("csg", [0.1, 0.25, 0.31, 0.36], 10, 200, epsilon=[0.5, 1.0, 1.5]),
        "fedpara": _arm("fedpara", [0.1, 0.2, 0.2, 0.2], 40, 40),
    }
    seed_1 = {
        "fedavg": _arm("fedavg", [0.1, 0.2, 0.3, 0.5], 100, 200, devices=[["cpu", "cpu"]] * 3),
        "csg": _arm("csg", [0.1, 0.3, 0.45, 0.49], 10, 200, epsilon=[0.5, 1.0, 2.0]),
    }
    seed_0["fedavg"]["server_device"], seed_1["fedavg"]["server_device"] = "cpu", "cuda"
    return {0: {"arms": seed_0}, 1: {"arms": seed_1}}


def test_a_spread_holds_each_seeds_value_and_their_mean_and_sample_std() -> None:
    two = Spread.of([1, None, 3])
    assert (two.values, two.n, two.mean, two.std) == ((1, None, 3), 2, 2.0, math.sqrt(2))
    assert two.record() == {"mean": 2.0, "std": math.sqrt(2), "n": 2, "values": [1, None, 3]}
    assert (Spread.of([0.4]).mean, Spread.of([0.4]).std) == (0.4, 0.0)
    assert (Spread.of([None]).mean, Spread.of([None]).std, Spread.of([None]).n) == (None, None, 0)


def test_summary_over_two_seeds_to_the_byte() -> None:
    summary = summarize(CONFIG, _seeds())
    assert list(summary) == ["fedavg", "fedpara", "csg"]  # the report's order (fedcsg.spec.arms.arm_order)
    fedavg, fedpara, csg = summary.values()
    assert (fedavg.arm, fedavg.uplink, fedavg.downlink, fedavg.seeds) == ("fedavg", "full", "full", (0, 1))
    assert fedavg.final_accuracy.values == (0.40, 0.5)
    assert fedavg.final_accuracy.mean == pytest.approx(0.45) and fedavg.final_accuracy.std == pytest.approx(
        0.05 * 2**0.5
    )
    assert fedavg.last_accuracy.values == (pytest.approx((0.2 + 0.35 + 0.40) / 3), pytest.approx((0.2 + 0.3 + 0.5) / 3))
    assert fedavg.rounds.values == (3, 3) and fedavg.wire_up_per_round.values == (100.0, 100.0)
    assert fedavg.wire_down_per_round.mean == 200.0 and fedavg.total_wire_bytes.values == (900, 900)
    # 30% in round 2 of both seeds (600 bytes); fedavg - 1 point is 39% and 49%, reached in round 3 (900).
    assert fedavg.wire_bytes_to_target.values == (600, 600) and fedavg.round_to_target.values == (2, 2)
    assert fedavg.match_accuracy.values == (pytest.approx(0.39), pytest.approx(0.49))
    assert fedavg.wire_bytes_to_match.values == (900, 900)
    assert fedavg.client_devices == {"cpu": 9, "cuda:0 X": 3} and fedavg.server_devices == ("cpu", "cuda")
    # csg: 210 bytes a round; 30% in round 2 of seed 0 (420) and round 1 of seed 1 (210); 39% never in
    # seed 0, 49% in round 3 of seed 1 (630).
    assert csg.wire_bytes_to_target.values == (420, 210) and csg.wire_bytes_to_target.mean == 315.0
    assert csg.wire_bytes_to_match.values == (None, 630) and csg.wire_bytes_to_match.n == 1
    assert csg.epsilon.values == (1.5, 2.0) and csg.epsilon.mean == 1.75 and fedavg.epsilon.n == 0
    assert csg.upload_ratio_vs_fedavg == 10.0 and csg.total_ratio_vs_fedavg == pytest.approx(900 / 630)
    # fedpara ran in seed 0 only: its figures hold None for seed 1.
    assert fedpara.seeds == (0,) and fedpara.final_accuracy.values == (0.2, None)
    assert fedpara.wire_bytes_to_target.values == (None, None) and fedpara.wire_bytes_to_target.mean is None


def test_a_one_seed_run_is_a_run_over_its_one_seed() -> None:
    seeds = _seeds()
    one = summarize(CONFIG, {0: seeds[0]})
    both = summarize(CONFIG, seeds)
    for arm in ("fedavg", "csg"):
        for figure in ("final_accuracy", "wire_bytes_to_target", "total_wire_bytes", "seconds", "epsilon"):
            single = getattr(one[arm], figure)
            assert single.values == getattr(both[arm], figure).values[:1]
            assert single.mean == (None if single.values[0] is None else single.values[0])
    assert one["csg"].wire_bytes_to_match.values == (None,) and one["csg"].total_ratio_vs_fedavg == pytest.approx(
        900 / 630
    )


def test_results_json_records_every_figure_as_a_spread() -> None:
    records = summary_records(summarize(CONFIG, _seeds()))
    csg = records["csg"]
    assert csg["seeds"] == [0, 1] and csg["uplink"] == "full" and csg["target_accuracy"] == 0.3
    assert csg["wire_bytes_to_target"] == {"mean": 315.0, "std": math.sqrt(2 * 105**2), "n": 2, "values": [420, 210]}
    assert csg["epsilon"] == {"mean": 1.75, "std": math.sqrt(0.125), "n": 2, "values": [1.5, 2.0]}
    assert "epsilon" not in records["fedavg"] and "arm" not in csg  # no DP in fedavg; the arm is the key
    assert records["fedavg"]["server_devices"] == ["cpu", "cuda"] and csg["upload_ratio_vs_fedavg"] == 10.0
    without_fedavg = summary_records(summarize(CONFIG, {0: {"arms": {"csg": _seeds()[0]["arms"]["csg"]}}}))
    assert "total_ratio_vs_fedavg" not in without_fedavg["csg"]
    assert without_fedavg["csg"]["match_accuracy"]["values"] == [None]


def test_without_a_fedavg_arm_no_report_table_has_bytes_to_fedavg() -> None:
    """The one-seed and the over-seeds table alike show `-` for bytes to fedavg - 1 point where there is no
    fedavg (the over-seeds table said "not reached" before both came from one summary)."""
    mb = 1_000_000
    arms = {
        0: {"arms": {"csg": _arm("csg", [0.1, 0.25, 0.31, 0.36], mb, 2 * mb)}},
        1: {"arms": {"csg": _arm("csg", [0.1, 0.3, 0.45, 0.49], mb, 2 * mb)}},
    }
    over = report_summary({"config": CONFIG, "seeds": [0, 1], "per_seed": {str(s): r for s, r in arms.items()}})
    (row,) = [line for line in over.splitlines() if line.startswith("| csg |")]
    assert row.endswith("| 9.000 ± 0.000 MB | - | 4.500 ± 2.121 MB | 1.5 ± 0.7 | - | 0.3600, 0.4900 |")
    one = report_summary({"config": CONFIG, "seed": 0, **arms[0]})
    (row,) = [line for line in one.splitlines() if line.startswith("| csg |")]
    assert row.endswith("| 9.000 MB | - | - | 6.000 MB (round 2) | - | 3.0 |")


def test_the_report_names_each_arm_whose_records_end_before_the_last_round() -> None:
    """A run in progress (or stopped) is reported as such, per arm and seed; a finished one says nothing."""
    from fedcsg.runs.report import _unfinished_lines

    seeds = _seeds()
    assert _unfinished_lines({"num-rounds": 3}, seeds) == []
    seeds[1]["arms"]["csg"]["rounds"] = seeds[1]["arms"]["csg"]["rounds"][:2]  # seed 1's csg stopped after round 1
    assert _unfinished_lines({"num-rounds": 3}, seeds) == [
        "",
        "Not finished: csg (seed 1) after round 1 of 3. Each such arm's figures are those of its last recorded "
        "round (`--resume DIR` continues an interrupted run).",
    ]
    one = {0: {"arms": {"fedavg": seeds[0]["arms"]["fedavg"]}}}
    assert _unfinished_lines({"num-rounds": 60}, one)[1].startswith("Not finished: fedavg after round 3 of 60.")
