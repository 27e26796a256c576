"""The report names a winner only when it can defend it: the fewest-bytes rule over seeds, accuracy
differences within noise, one seed said as one seed; and the over-seeds table's figures (no Ray here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcsg.runs.records import ArmRecorder
from fedcsg.runs.report import report_summary, write_report
from fedcsg.runs.summary import Spread
from fedcsg.runs.winner import (
    ONE_SEED,
    WINNER_RULE,
    accuracy_noise_sentence,
    fewest_bytes_over_seeds,
    one_seed_bytes_sentence,
    seeds_won,
)
from fedcsg.spec.config import RunConfig

from .records import round_record

MB = 1e6


def test_an_arm_with_fewer_bytes_in_every_seed_is_named() -> None:
    sentence = fewest_bytes_over_seeds(
        {"fedavg": [100 * MB, 120 * MB], "csg": [40 * MB, 50 * MB], "csg-frozen": [45 * MB, 60 * MB]}, "the goal"
    )
    assert sentence == (
        "Fewest wire bytes to the goal: **csg**, 45.000 MB ± 7.071 MB, fewer than every other arm in each of the "
        "2 seeds (2.44x fewer than fedavg on average); next csg-frozen, 52.500 MB ± 10.607 MB (1.17x more)."
    )


def test_an_arm_that_loses_one_seed_to_the_runner_up_is_not_separated() -> None:
    # csg has the lower mean (45 against 46.5 MB) but csg-frozen needs fewer bytes in seed 1.
    sentence = fewest_bytes_over_seeds(
        {"fedavg": [100 * MB, 120 * MB], "csg": [40 * MB, 50 * MB], "csg-frozen": [45 * MB, 48 * MB]}, "the goal"
    )
    assert sentence == (
        "Fewest wire bytes to the goal: not separated over the 2 seeds: csg has the lowest mean "
        "(45.000 MB ± 7.071 MB) but does not need fewer bytes in every seed than csg-frozen (fewer in 1 of 2)."
    )
    assert "**" not in sentence
    # A tie in a seed is not "fewer".
    assert seeds_won([40 * MB, 50 * MB], [40 * MB, 60 * MB]) == 1


def test_an_arm_that_reaches_the_goal_in_some_seeds_only() -> None:
    base = {"fedavg": [100 * MB, 120 * MB, 110 * MB], "csg": [40 * MB, 50 * MB, 45 * MB], "fedpara": [None] * 3}
    # Fewer bytes than csg where it gets there, but it misses seed 1: never named, and csg is not named over it.
    cheaper = fewest_bytes_over_seeds({**base, "csg+int8": [30 * MB, None, 35 * MB]}, "the goal")
    assert cheaper == (
        "Fewest wire bytes to the goal: not separated over the 3 seeds: csg has the lowest mean "
        "(45.000 MB ± 5.000 MB) but does not need fewer bytes in every seed than csg+int8 (fewer in 1 of 3); "
        "reached in some seeds only by csg+int8 (2 of 3); not reached by fedpara."
    )
    # More bytes than csg wherever it gets there: csg, which reaches the goal in every seed, is named over it.
    dearer = fewest_bytes_over_seeds({**base, "csg+int8": [60 * MB, None, 70 * MB]}, "the goal")
    assert dearer == (
        "Fewest wire bytes to the goal: **csg**, 45.000 MB ± 5.000 MB, fewer than every other arm in each of the "
        "3 seeds (2.44x fewer than fedavg on average); next fedavg, 110.000 MB ± 10.000 MB (2.44x more); "
        "reached in some seeds only by csg+int8 (2 of 3); not reached by fedpara."
    )
    # Cheapest in one seed, missing the other, and no arm reaches it every time: nobody is named.
    assert fewest_bytes_over_seeds({"fedavg": [None, None], "csg+int8": [30 * MB, None]}, "the goal") == (
        "No arm reached the goal in every one of the 2 seeds; reached in some seeds by csg+int8 (1 of 2)."
    )


def test_one_seed_says_it_is_one_seed() -> None:
    assert one_seed_bytes_sentence({"fedavg": 100 * MB, "csg": 40 * MB, "fedpara": None}, "the goal") == (
        "Fewest wire bytes to the goal: **csg**, 40.000 MB (2.50x fewer than fedavg); next fedavg, 100.000 MB "
        "(2.50x more); not reached by fedpara. One seed: no noise estimate separates any two arms "
        "(`--seeds 0,1,2` gives one)."
    )


def test_accuracy_differences_are_judged_seed_by_seed() -> None:
    spreads = {
        "fedavg": Spread.of([0.40, 0.50, 0.45]),
        # 2 to 3 points behind in every seed: the per-seed differences -2, -3, -2.5 have std 0.5, so the mean
        # -2.5 is beyond 2 std (1.00), although each arm's own spread over the seeds is 5 points.
        "csg": Spread.of([0.38, 0.47, 0.425]),
        # +5, -8, +1: a mean of -0.67 against a std of 6.66 (2 std = 13.32) is within noise.
        "csg-frozen": Spread.of([0.45, 0.42, 0.46]),
        "fedpara": Spread.of([None, 0.40, None]),  # one seed in common with fedavg
    }
    assert accuracy_noise_sentence(spreads, "final accuracy") == (
        "Mean final accuracy against fedavg (0.4500 ± 0.0500), seed by seed (per seed in points): csg -2.50 points "
        "(-2.0, -3.0, -2.5), beyond noise (2 std = 1.00 points); csg-frozen -0.67 points (+5.0, -8.0, +1.0), "
        "within noise (2 std = 13.32 points); fedpara -10.00 points (-10.0), one seed in common: no noise estimate."
    )
    assert accuracy_noise_sentence({"csg": Spread.of([0.3])}, "final accuracy") == ""


# -- the report over seeds, from constructed seed records -------------------------------------------


def write_arm(
    out: Path, arm: str, accuracies: list[float], seed: int, up: int, down: int, resync: int = 0, **settings: Any
) -> None:
    """Constructed records of ``arm`` (one seed) in ``out``: ``up`` / ``down`` wire bytes a round, and
    ``resync`` of the round-1 downlink sent in full; ``settings`` are RunConfig fields."""
    cfg = RunConfig(seed=seed, num_rounds=len(accuracies) - 1, target_accuracy=0.3, **settings)
    recorder = ArmRecorder(out, arm, {**cfg.to_flower(), "arm": arm})
    for rnd, accuracy in enumerate(accuracies):
        record = round_record(
            rnd,
            accuracy,
            up=up,
            down=down,
            resynced=2 if rnd == 1 and resync else 0,
            wire_down_resync=resync if rnd == 1 else 0,
        )
        recorder.add(record, save=False)
    recorder.save()


def test_report_over_seeds_states_the_rule_and_shows_every_spread(tmp_path: Path) -> None:
    runs = {  # arm: (accuracies per seed, up, down, resync bytes of round 1)
        "fedavg": ([[0.1, 0.2, 0.35, 0.40], [0.1, 0.2, 0.35, 0.50]], 2_000_000, 2_000_000, 0),
        "csg+int8/delta-int8": ([[0.1, 0.2, 0.31, 0.30], [0.1, 0.25, 0.33, 0.36]], 500_000, 1_000_000, 900_000),
    }
    for seed in (0, 1):
        for arm, (accuracies, up, down, resync) in runs.items():
            write_arm(tmp_path / f"seed-{seed}", arm, accuracies[seed], seed, up, down, resync)
    results = write_report(tmp_path)
    csg = results["summary"]["csg+int8/delta-int8"]
    assert csg["last_accuracy"]["values"] == [(0.2 + 0.31 + 0.30) / 3, (0.25 + 0.33 + 0.36) / 3]
    assert csg["wire_down_resync"]["mean"] == 900_000 and csg["resynced"]["mean"] == 2
    report = (tmp_path / "report.md").read_text()
    assert WINNER_RULE in report and ONE_SEED not in report
    # What `compare` prints: the report down to its per-round table, built from the results in memory.
    assert report_summary(results) == report.split("## Test accuracy per round")[0].strip()
    assert report_summary(write_report(tmp_path / "seed-0")) == (
        (tmp_path / "seed-0" / "report.md").read_text().split("## Test accuracy per round")[0].strip()
    )
    # Both arms reach 30% in round 2 of each seed: 2 x 1.5 MB against 2 x 4 MB.
    assert (
        "Fewest wire bytes to the target accuracy 30%: **csg+int8/delta-int8**, 3.000 MB ± 0.000 MB, fewer than "
        "every other arm in each of the 2 seeds (2.67x fewer than fedavg on average); next fedavg, "
        "8.000 MB ± 0.000 MB (2.67x more)." in report
    )
    assert (
        "| csg+int8/delta-int8 | int8 | delta-int8 | 0.3300 ± 0.0424 | 0.3350 ± 0.0354 | 0.2917 ± 0.0306 | "
        "0.500 ± 0.000 MB | 1.000 ± 0.000 MB | 0.900 ± 0.000 MB | 4.500 ± 0.000 MB | 2.67x |" in report
    )
    assert "| fedavg | full | full | 0.4500 ± 0.0707 | 0.4500 ± 0.0707 | 0.3333 ± 0.0236 |" in report
    assert "| 2.000 ± 0.000 MB | 2.000 ± 0.000 MB | - | 12.000 ± 0.000 MB | 1.00x |" in report
    assert (
        "Mean final accuracy against fedavg (0.4500 ± 0.0707), seed by seed (per seed in points): "
        "csg+int8/delta-int8 -12.00 points (-10.0, -14.0), beyond noise (2 std = 5.66 points)." in report
    )
    assert (
        "Mean accuracy of the last 3 rounds against fedavg (0.3333 ± 0.0236), seed by seed (per seed in points): "
        "csg+int8/delta-int8 -4.17 points (-4.7, -3.7), beyond noise (2 std = 1.41 points)." in report
    )
    # fedavg - 1 point is 39% in seed 0 and 49% in seed 1: the delta arm gets to neither.
    assert (
        "Fewest wire bytes to fedavg's final accuracy - 1 point (44.00%): **fedavg**, 12.000 MB ± 0.000 MB, fewer "
        "than every other arm in each of the 2 seeds; not reached by csg+int8/delta-int8." in report
    )
    # Each seed's own report says that it is one seed.
    assert ONE_SEED in (tmp_path / "seed-0" / "report.md").read_text()
