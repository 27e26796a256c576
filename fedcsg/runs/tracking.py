"""Experiment tracking (run setting ``tracker``): every round of an arm logged to TensorBoard or MLflow
as it is recorded, one tracked run per arm and seed, with the run config as its parameters.

``tensorboard`` writes event files under ``RUN_DIR/tensorboard/<arm>`` (``tensorboard --logdir
RUN_DIR/tensorboard``); ``mlflow`` logs to the tracking URI of ``MLFLOW_TRACKING_URI``, else to
``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri RUN_DIR/mlruns``), experiment ``fedcsg``. Both are
an install extra (``pip install "fedcsg[track]"``); the default, ``none``, imports neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedcsg.spec.arms import file_stem

# Scalar name -> the round record's field it logs (bytes are wire bytes, as the report counts them).
SCALARS = {
    "test/accuracy": "test_accuracy",
    "test/loss": "test_loss",
    "bytes/up": "wire_up",
    "bytes/down": "wire_down",
    "bytes/cumulative_up": "cum_wire_up",
    "bytes/cumulative_down": "cum_wire_down",
    "train/filter_step": "filter_step",
    "train/lr": "lr",
}
CUMULATIVE = "bytes/cumulative"  # cum_wire_up + cum_wire_down


class Tracker(Protocol):
    def log_round(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars a round record gives (:data:`SCALARS`, and :data:`CUMULATIVE`); fields a round lacks
    (round 0 has no lr) are left out."""
    scalars = {name: float(record[key]) for name, key in SCALARS.items() if record.get(key) is not None}
    if "cum_wire_up" in record and "cum_wire_down" in record:
        scalars[CUMULATIVE] = float(record["cum_wire_up"] + record["cum_wire_down"])
    return scalars


class _NoTracker:
    def log_round(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars per round in ``log_dir``; the run config as hyperparameters and as a text."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))
        self.writer.add_hparams(_params(config), {}, run_name=".")

    def log_round(self, record: Mapping[str, Any]) -> None:
        for name, value in round_scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run of experiment ``fedcsg``: the run config as parameters, scalars per round as metrics."""

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow's file store: no database to install (MLflow keeps it, in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").absolute().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("fedcsg")
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params(_params(config))

    def log_round(self, record: Mapping[str, Any]) -> None:
        metrics = {name.replace("/", "."): value for name, value in round_scalars(record).items()}
        self.mlflow.log_metrics(metrics, step=int(record["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(tracker: str, run_dir: Path, arm: str, seed: int, config: Mapping[str, Any]) -> Tracker:
    """The tracker ``tracker`` names (a key of :data:`~fedcsg.spec.config.TRACKERS`) for ``arm`` and
    ``seed`` of the run in ``run_dir``."""
    if tracker == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard" / file_stem(arm), config)
    if tracker == "mlflow":
        return MlflowTracker(run_dir, f"{arm} seed {seed}", config)
    return _NoTracker()


def _params(config: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    return {k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in config.items()}
