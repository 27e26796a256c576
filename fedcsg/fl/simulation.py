"""Run one arm through Flower's simulation engine (Ray backend) from Python.

This is what ``flwr run .`` does inside its SuperLink, without the detached SuperLink process,
the app installation under $FLWR_HOME and the `uv sync` of the dependencies: the ServerApp and
ClientApp are loaded by their import paths from an app directory holding a generated
pyproject.toml whose [tool.flwr.app.config] is the validated run config, so the ServerApp's and
every virtual ClientApp's ``context.run_config`` are exactly that config.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from fedcsg.fl.flower_logs import REPORTED_CLIENT_ERRORS
from fedcsg.fl.ray_cluster import dying_with_us, interruptible, set_accelerator_env, started_ray
from fedcsg.fl.run_data import partition_rows
from fedcsg.nn.imported_models import code_to_ship
from fedcsg.runs.layout import arm_record_path
from fedcsg.spec.config import RunConfig

SERVER_APP = "fedcsg.fl.server_app:app"
CLIENT_APP = "fedcsg.fl.client_app:app"


def app_pyproject(cfg: RunConfig) -> dict:
    """A minimal Flower App project whose run config is ``cfg``."""
    return {
        "project": {"name": "fedcsg-run", "version": "0.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedcsg",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": cfg.to_flower(),
                }
            }
        },
    }


def backend_config(cfg: RunConfig) -> dict:
    """Ray backend settings: per-client resources, and the Ray to use (``ray-address``, see
    :mod:`fedcsg.fl.ray_cluster`). On each node Ray runs min(CPUs / num_cpus, GPUs / num_gpus)
    clients at once and sets each actor's OMP_NUM_THREADS to its num_cpus. ``client-num-gpus``
    must be resolved already (:func:`~fedcsg.fl.ray_cluster.resolve_resources`). No ``init_args``:
    :func:`simulate` starts Ray itself (:func:`~fedcsg.fl.ray_cluster.started_ray`)."""
    if cfg.client_num_gpus == "auto":
        raise ValueError('client-num-gpus = "auto" must be resolved for the cluster before the simulation starts')
    return {"client_resources": {"num_cpus": cfg.client_num_cpus, "num_gpus": cfg.client_num_gpus}}


ENGINE_KEYS = ("num-clients", "client-num-cpus", "client-num-gpus", "ray-address")


def check_engine(runs: Sequence[RunConfig]) -> RunConfig:
    """The first of ``runs``, after checking that all of them can share one simulation: the same
    number of virtual SuperNodes, client resources and Ray (arms and seeds may differ)."""
    if not runs:
        raise ValueError("no run to simulate")
    first = runs[0].to_flower()
    for cfg in runs[1:]:
        other = cfg.to_flower()
        differing = [key for key in ENGINE_KEYS if first[key] != other[key]]
        if differing:
            raise ValueError(f"runs of one simulation must share {', '.join(differing)}")
    return runs[0]


def user_code(runs: Sequence[RunConfig]) -> list[str]:
    """The packages and modules of the user's own that the clients of ``runs`` import and that Ray must
    ship to its workers (:func:`~fedcsg.nn.imported_models.code_to_ship` of each run's model), once each."""
    return sorted({path for cfg in runs for path in code_to_ship(cfg.model)})


def simulate(runs: Sequence[RunConfig], *, verbose: bool = False) -> None:
    """Run every config of ``runs`` in turn (an arm of one seed each, its records in its ``out_dir``)
    in ONE Flower simulation on ``num-clients`` virtual SuperNodes: Ray and its pool of client
    actors start once for all of them, and each actor keeps the data it decoded.

    The ServerApp runs them one after the other (:func:`fedcsg.fl.server_app.planned_runs`), each
    through its own strategy; a run in which no round aggregated a client update stops the plan with
    :class:`~fedcsg.runs.records.RunFailed` after its records are written. SIGTERM, like Ctrl-C, ends
    the simulation with KeyboardInterrupt after shutting down what it started
    (:func:`~fedcsg.fl.ray_cluster.interruptible`); the records hold every round completed before.
    The code of a model of the user's own travels to every Ray worker with the Ray job
    (:func:`user_code`).
    """
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedcsg.fl.flower_private import run_simulation, simulation_run
    from fedcsg.fl.server_app import PLAN_KEY

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    set_accelerator_env()
    runs = [cfg.replace(out_dir=str(Path(cfg.out_dir).absolute())) for cfg in runs]
    first = check_engine(runs)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(REPORTED_CLIENT_ERRORS)
    # Every client's partition of every seed, computed once here and cached on disk: the clients read
    # theirs from the cache without importing flwr-datasets (fedcsg.data.partitions).
    for cfg in {cfg.data_settings: cfg for cfg in runs}.values():
        partition_rows(cfg, 0, cfg.num_clients)
    plan = RecordDict({PLAN_KEY: ConfigRecord({"runs": [json.dumps(cfg.to_flower()) for cfg in runs]})})
    with (
        dying_with_us(first.ray_address),
        interruptible(),
        tempfile.TemporaryDirectory(prefix="fedcsg-app-") as app_dir,
        started_ray(first.ray_address, user_code(runs)),
    ):
        (Path(app_dir) / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(first)))
        run = simulation_run()
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=plan, run_config=first.to_flower())
        run_simulation(
            num_supernodes=first.num_clients,
            server_app_attr=SERVER_APP,
            client_app_attr=CLIENT_APP,
            backend_name="ray",
            backend_config=backend_config(first),
            app_dir=app_dir,
            run=run,
            server_app_context=context,
            is_app=True,
            verbose_logging=verbose,
        )
    for cfg in runs:
        if not arm_record_path(Path(cfg.out_dir), cfg.arm).is_file():
            raise RuntimeError(f"the simulation of arm {cfg.arm!r} ended without results (see the log above)")
