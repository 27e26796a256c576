"""Experiment tracking (fedcsg.runs.tracking): the rounds of a recorded arm logged to TensorBoard and
MLflow and read back with their own readers. Through Ray: tests/test_simulation.py (`own` run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcsg.runs.tracking import CUMULATIVE, MlflowTracker, TensorBoardTracker, round_scalars
from fedcsg.spec.config import RunConfig

RECORDED = Path(__file__).resolve().parents[1] / "docs" / "headline-run" / "seed-0" / "arms" / "csg.json"


def _rounds() -> tuple[dict, list[dict]]:
    document = json.loads(RECORDED.read_text())
    return document["config"], document["rounds"]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_rounds_scalars(tmp_path: Path) -> None:
    config, rounds = _rounds()
    tracker = TensorBoardTracker(tmp_path / "csg", config)
    for record in rounds:
        tracker.log_round(record)
    tracker.close()
    scalars = tensorboard_scalars(tmp_path / "csg")
    assert [step for step, _ in scalars["test/accuracy"]] == [r["round"] for r in rounds]
    assert [v for _, v in scalars["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in rounds])
    # TensorBoard keeps float32: the bytes as float32 holds them.
    assert [v for _, v in scalars[CUMULATIVE]] == [
        float(np.float32(r["cum_wire_up"] + r["cum_wire_down"])) for r in rounds
    ]
    assert [v for _, v in scalars["bytes/up"]] == [float(np.float32(r["wire_up"])) for r in rounds]
    assert [step for step, _ in scalars["train/lr"]] == [r["round"] for r in rounds if r.get("lr") is not None]


def test_mlflow_holds_the_config_and_every_rounds_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, rounds = _rounds()
    tracker = MlflowTracker(tmp_path, "csg seed 0", config)
    for record in rounds:
        tracker.log_round(record)
    tracker.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedcsg").experiment_id])
    assert run.info.run_name == "csg seed 0" and run.data.params["arm"] == "csg"
    assert run.data.params["num-rounds"] == str(config["num-rounds"])
    history = client.get_metric_history(run.info.run_id, "test.accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["test_accuracy"]) for r in rounds]
    assert (
        round_scalars(rounds[-1])[CUMULATIVE]
        == client.get_metric_history(run.info.run_id, "bytes.cumulative")[-1].value
    )


def test_a_tracker_is_one_of_three_and_not_part_of_the_identity() -> None:
    with pytest.raises(ValueError, match="tracker = 'wandb' is not accepted: one of none, tensorboard, mlflow is"):
        RunConfig(tracker="wandb")
    assert RunConfig(tracker="tensorboard").identity() == RunConfig().identity()
