"""The fedcsg ServerApp: one arm of a federated run with CSGFedAvg, server-side evaluation on the
test split after every round, and per-round records with bytes in both directions."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedcsg.data.batches import data_on
from fedcsg.data.readers import ImageData
from fedcsg.fl.filter_step import PayloadFilters
from fedcsg.fl.flower_private import InMemoryGrid
from fedcsg.fl.node_restarts import RestartAwareGrid
from fedcsg.fl.privacy import Configure, Privacy, accountant
from fedcsg.fl.run_data import test_data
from fedcsg.fl.server_opt import Mask, ServerOptimizer
from fedcsg.fl.strategy import CSGFedAvg, lr_schedule
from fedcsg.fl.task import build_arm_model, evaluate_model, payload_layout, round_layout
from fedcsg.fl.traffic import bundle_download_bytes
from fedcsg.nn.csg_factors import FACTORS, factor_keys, frozen_keys, round_factor
from fedcsg.nn.determinism import set_deterministic
from fedcsg.nn.devices import describe
from fedcsg.nn.params import count_parameters
from fedcsg.nn.training import get_device, set_seed
from fedcsg.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from fedcsg.runs.layout import model_file_path
from fedcsg.runs.model_file import save_global_model
from fedcsg.runs.records import ArmRecorder, check_trained
from fedcsg.runs.report import write_report
from fedcsg.runs.tracking import Tracker, open_tracker
from fedcsg.spec.config import RunConfig
from fedcsg.wire.downlink import Downlink
from fedcsg.wire.handoff import Handoff
from fedcsg.wire.messages import TEST_ACCURACY, TEST_LOSS, TrainInstruction
from fedcsg.wire.payload import PayloadLayout, load_payload, model_payload
from fedcsg.wire.uplink import Uplink

app = ServerApp()


def min_replies(cfg: RunConfig) -> int:
    """Accepted replies a round needs: min-train-nodes, but never more than the clients sampled."""
    return max(1, min(cfg.min_train_nodes, cfg.sampled_clients))


def build_server_optimizer(cfg: RunConfig) -> ServerOptimizer:
    return ServerOptimizer(
        cfg.server_optimizer,
        lr=cfg.server_lr,
        momentum=cfg.server_momentum,
        beta_1=cfg.server_beta1,
        beta_2=cfg.server_beta2,
        tau=cfg.server_tau,
    )


def round_factor_fn(cfg: RunConfig, model: nn.Module) -> Callable[[int], str]:
    """``server_round -> the CSG factor the clients train`` under ``cfg.csg_aggregation``."""
    trainable_generator = bool(factor_keys(model)["generator"])
    return lambda server_round: round_factor(cfg.csg_aggregation, server_round, trainable_generator, cfg.frozen_after)


def optimizer_mask_fn(cfg: RunConfig, model: nn.Module, layout: PayloadLayout) -> Callable[[int], Mask]:
    """``server_round -> the payload elements the server optimizer moves``: the trainable
    parameters, minus the CSG factor frozen in that round; BatchNorm statistics (buffers) and
    integer counters always take the exact average."""
    parameters = {name for name, p in model.named_parameters() if p.requires_grad}
    factor_of = round_factor_fn(cfg, model)
    masks = {factor: layout.element_mask(parameters - set(frozen_keys(model, factor))) for factor in FACTORS}
    return lambda server_round: masks[factor_of(server_round)]


def privacy_fn(cfg: RunConfig, account: Any) -> Callable[[Configure], Privacy] | None:
    """``configure -> Privacy`` of ``cfg.dp`` over ``cfg``'s sampled clients with the run's accountant ``account``
    (:func:`fedcsg.fl.privacy.accountant`); None without DP."""
    if cfg.dp == "none":
        return None
    return lambda configure: Privacy(cfg, cfg.sampled_clients, configure, account)


def build_strategy(
    cfg: RunConfig,
    layout: PayloadLayout,
    model: nn.Module | None = None,
    handoff: Handoff | None = None,
    account: Any = None,
) -> CSGFedAvg:
    """The strategy of ``cfg``'s arm for the payload ``layout`` (:func:`~fedcsg.fl.task.round_layout`), handing
    ``handoff``'s arrays to the nodes that do not hold them, accounting privacy in ``account`` (the run's
    accountant, which the phases of a csg-warm arm share; None: a new one)."""
    model = model if model is not None else build_arm_model(cfg)
    factor_of = round_factor_fn(cfg, model)
    account = account if account is not None else accountant(cfg)
    return CSGFedAvg(
        layout,
        lr_fn=lr_schedule(cfg.lr, cfg.lr_schedule, cfg.num_rounds),
        seed=cfg.seed,
        min_replies=min_replies(cfg),
        failed_round=cfg.failed_round,
        max_update_norm=cfg.max_update_norm,
        server_optimizer=build_server_optimizer(cfg),
        mask_fn=optimizer_mask_fn(cfg, model, layout),
        train_factor_fn=factor_of,
        uplink=Uplink(layout, cfg.codec),
        downlink=Downlink.of_config(cfg, layout),
        handoff=handoff,
        payload_filters=PayloadFilters(model, layout),
        privacy_fn=privacy_fn(cfg, account),
        **cfg.sampling,
    )


def recorded_config(cfg: RunConfig) -> dict:
    """The config written with the results: the run's settings, without ``resume`` (an instruction
    to this process, not a setting of the run)."""
    return {k: v for k, v in cfg.to_flower().items() if k != "resume"}


def resumable_checkpoint(cfg: RunConfig, out_dir: Path, layout: PayloadLayout) -> Checkpoint | None:
    """The checkpoint to continue from: None unless ``cfg.resume`` and ``out_dir`` holds one of this arm,
    which must have been written under ``cfg``'s identity (ValueError otherwise)."""
    checkpoint = load_checkpoint(out_dir, cfg.arm, layout) if cfg.resume else None
    if checkpoint is not None:
        checkpoint.check_written_under(cfg.identity(), out_dir)
    return checkpoint


def arm_recorder(
    cfg: RunConfig,
    out_dir: Path,
    model: nn.Module,
    layout: PayloadLayout,
    resumed_from: list[int],
    bundle_bytes: int | None = None,
    server_device: str = "cpu",
) -> ArmRecorder:
    """The recorder of ``out_dir/arms/<arm>.json``, with what the arm sends besides its rounds:
    ``bundle_bytes`` is the app bundle each node downloads once per run (None in a simulation);
    and ``server_device``, where the server evaluated (:func:`~fedcsg.nn.devices.describe`)."""
    return ArmRecorder(
        out_dir,
        cfg.arm,
        recorded_config(cfg),
        extra={
            "parameters": count_parameters(model).as_dict(),
            "payload_bytes": layout.nbytes,
            "payload_keys": layout.keys,
            "resumed_from": resumed_from,
            "bundle_bytes": bundle_bytes,
            "server_device": server_device,
        },
    )


def run_instruction(cfg: RunConfig) -> TrainInstruction:
    """What every train message of ``cfg``'s run tells its client besides the round: the local training
    settings and which run it belongs to (arm and seed: one simulation may hold several runs,
    :func:`planned_runs`, whose clients share the run config of the first)."""
    return TrainInstruction(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, arm=cfg.arm, seed=cfg.seed)


def progress_line(cfg: RunConfig, record: dict, elapsed: float) -> str:
    """One line per round for the log: accuracy, loss, bytes so far, time."""
    total_mb = (record["cum_wire_up"] + record["cum_wire_down"]) / 1e6
    status = "" if record["status"] in ("ok", "initial") else f" [{record['status']}]"
    return (
        f"[{cfg.arm}] round {record['round']}/{cfg.num_rounds}{status}: test accuracy {record['test_accuracy']:.4f}, "
        f"loss {record['test_loss']:.4f}, {total_mb:.2f} MB so far, {elapsed:.1f}s"
    )


def phases(cfg: RunConfig) -> list[tuple[int, int]]:
    """The spans of rounds (first, last) in which one payload travels: every round, or for a csg-warm arm
    rounds 1..K (generator, codes, ordinary layers) and K+1..N (codes and ordinary layers)."""
    k = cfg.frozen_after
    return [(1, k), (k + 1, cfg.num_rounds)] if k else [(1, cfg.num_rounds)]


def run_federation(grid: Grid, cfg: RunConfig, out_dir: Path, progress: Callable[[str], None] = print) -> list[dict]:
    """Run ``cfg.arm`` for ``cfg.num_rounds`` rounds; after every round write ``out_dir/arms/<arm>.json``
    and the checkpoint ``out_dir/state/<arm>.*``.

    With ``cfg.resume`` and a checkpoint in ``out_dir``, continue after its round from its global
    payload, round records and RNG states; the config must have the checkpoint's identity. Each of the
    arm's :func:`phases` runs with its own strategy; checkpoints and the final model file always hold
    the arm's whole payload (a csg-warm arm's frozen generator included).
    """
    set_seed(cfg.seed)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    checkpoint = resumable_checkpoint(cfg, out_dir, layout)
    set_deterministic(cfg.deterministic)
    device = get_device(cfg.server_device)
    test = data_on(test_data(cfg), device)  # on the server's device for the whole run
    resumed_from = [*checkpoint.resumed_from, checkpoint.round] if checkpoint else []
    recorder = arm_recorder(
        cfg, out_dir, model, layout, resumed_from, bundle_download_bytes(grid.run), describe(device)
    )
    if checkpoint is not None:
        recorder.rounds = [dict(r) for r in checkpoint.rounds]
        set_rng_state(checkpoint.rng)
        progress(f"[{cfg.arm}] resuming after round {checkpoint.round}/{cfg.num_rounds} from {checkpoint.weights_path}")
    arrays = checkpoint.arrays if checkpoint else model_payload(model, layout)
    first_round = checkpoint.round + 1 if checkpoint else 1
    if first_round > cfg.num_rounds:  # complete already: only the arm file may need rewriting
        recorder.save()
        return recorder.rounds
    tracker = open_tracker(cfg.tracker, out_dir, cfg.arm, cfg.seed, recorded_config(cfg))
    # A resumed run's earlier rounds were tracked before it stopped.
    run = _Federation(
        grid, cfg, out_dir, model, layout, test, device, recorder, resumed_from, progress, tracker, len(recorder.rounds)
    )
    run.accountant = accountant(cfg)
    try:
        for first, last in phases(cfg):
            if last >= first_round and "stopped_by_privacy" not in recorder.extra:
                arrays = run.phase(arrays, first, last, first_round, checkpoint)
    finally:
        tracker.close()
    # The final global model, with its settings in the metadata: `fedcsg export --checkpoint` reads it.
    save_global_model(out_dir, cfg, arrays, name=model_file_path(out_dir, cfg.arm).name)
    return recorder.rounds


@dataclasses.dataclass
class _Federation:
    """What the phases of one arm's run share: the server's model (holding what the payload leaves out),
    its test data, the recorder and the checkpoint settings."""

    grid: Grid
    cfg: RunConfig
    out_dir: Path
    model: nn.Module
    layout: PayloadLayout  # the arm's whole payload: checkpoints and the model file hold it
    test: ImageData
    device: torch.device
    recorder: ArmRecorder
    resumed_from: list[int]
    progress: Callable[[str], None]
    tracker: Tracker
    tracked: int  # round records handed to the tracker so far
    accountant: Any = None  # the run's privacy accountant (dp), shared by its phases
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def track(self) -> None:
        """Hand the tracker the round records it has not seen (round 0's with round 1's)."""
        for record in self.recorder.rounds[self.tracked :]:
            self.tracker.log_round(record)
        self.tracked = len(self.recorder.rounds)

    def phase(
        self, arrays: ArrayRecord, first: int, last: int, first_round: int, checkpoint: Checkpoint | None
    ) -> ArrayRecord:
        """Rounds ``max(first, first_round)..last`` from the whole payload ``arrays``; returns the whole
        payload after them."""
        cfg, layout, model = self.cfg, self.layout, self.model
        sent = round_layout(cfg, model, first)
        load_payload(model, arrays, layout)  # the server's model holds the entries its clients are handed
        handoff = None
        if sent.held:
            held = layout.subset(sent.held)
            handoff = Handoff(held, held.pack(layout.unpack(arrays)))
            self.recorder.extra["handoff"] = {"after_round": first - 1, "hash": handoff.digest, "bytes": held.nbytes}
        strategy = build_strategy(cfg, sent, model, handoff, self.accountant)
        if checkpoint is not None and first <= checkpoint.round + 1 <= last:
            strategy.load_state_dict(checkpoint.strategy, checkpoint.downlink_arrays)

        def whole(phase_arrays: ArrayRecord) -> ArrayRecord:
            return layout.pack({**layout.unpack(arrays), **sent.unpack(phase_arrays)})

        def evaluate_fn(server_round: int, phase_arrays: ArrayRecord) -> MetricRecord:
            load_payload(model, phase_arrays, sent)
            stats = evaluate_model(model, self.test, cfg, self.device)
            return MetricRecord({TEST_ACCURACY: stats.accuracy, TEST_LOSS: stats.loss})

        def round_end_fn(server_round: int, phase_arrays: ArrayRecord) -> None:
            # The arm file first, then the checkpoint, whose state JSON is the commit point: a kill in
            # between leaves the arm file one round ahead, and the resumed run redoes that round from
            # the checkpoint and rewrites the arm file, so a complete checkpoint always has a complete
            # arm file beside it. The strategy handed the round's record to the recorder after evaluating it.
            self.progress(progress_line(cfg, self.recorder.rounds[-1], time.perf_counter() - self.started))
            self.recorder.save()
            self.track()
            save_checkpoint(
                self.out_dir,
                cfg.arm,
                server_round,
                whole(phase_arrays),
                num_rounds=cfg.num_rounds,
                rounds=self.recorder.rounds,
                config=recorded_config(cfg),
                identity=cfg.identity(),
                strategy=strategy.state_dict(),
                resumed_from=self.resumed_from,
                downlink_arrays=strategy.downlink_arrays(),
            )

        result = strategy.start(
            grid=self.grid,
            initial_arrays=sent.pack(layout.unpack(arrays)),
            num_rounds=last,
            timeout=cfg.round_timeout,
            train_config=run_instruction(cfg).record(),
            evaluate_fn=evaluate_fn,
            first_round=max(first, first_round),
            evaluate_initial=checkpoint is None and first == 1,
            round_end_fn=round_end_fn,
            recorder=self.recorder,
        )
        if strategy.stopped_by_privacy:
            self.recorder.extra["stopped_by_privacy"] = strategy.stopped_by_privacy
            self.recorder.save()
            self.progress(f"[{cfg.arm}] dp-max-epsilon = {cfg.dp_max_epsilon:g}: {strategy.stopped_by_privacy}")
        return whole(result.arrays)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


PLAN_KEY = "fedcsg-plan"  # Context.state record of a simulation's runs (fedcsg.fl.simulation.simulate)


def planned_runs(context: Context) -> list[RunConfig]:
    """The runs this ServerApp is to run in turn: the plan that :func:`fedcsg.fl.simulation.simulate`
    puts in the server's ``Context.state``, else (``flwr run``) the one run of the run config."""
    if PLAN_KEY not in context.state:
        return [RunConfig.from_mapping(dict(context.run_config))]
    record = context.state[PLAN_KEY]
    assert isinstance(record, ConfigRecord)
    return [RunConfig.from_mapping(json.loads(text)) for text in record["runs"]]


def run_header(cfg: RunConfig) -> str:
    """The line that opens a run of one arm in the log."""
    seed = f", seed {cfg.seed}" if cfg.seeds else ""
    return f"== arm {cfg.arm}: {cfg.model} on {cfg.dataset}, {cfg.num_clients} clients, {cfg.num_rounds} rounds{seed}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp: every planned run in turn (a simulation of ``fedcsg run`` or
    ``compare``, whose CLI writes the report), or the one run of `flwr run .`, whose config comes
    from [tool.flwr.app.config] and --run-config and whose report is written here.

    A run in which no round aggregated a client update raises :class:`~fedcsg.runs.records.RunFailed`
    once its records (and, for `flwr run`, its report) are written: Flower then marks the run failed.
    """
    if PLAN_KEY in context.state:
        for cfg in planned_runs(context):
            print(run_header(cfg), flush=True)
            check_trained(cfg.arm, run_federation(grid, cfg, Path(cfg.out_dir), progress=_to_stderr))
        return
    (cfg,) = planned_runs(context)
    out_dir = Path(cfg.out_dir or f"runs/flwr-{context.run_id}")
    if not isinstance(grid, InMemoryGrid):  # real SuperNodes: a node that restarts mid-round is not waited for
        grid = RestartAwareGrid(grid)
    rounds = run_federation(grid, cfg, out_dir, progress=_to_stderr)
    write_report(out_dir)
    check_trained(cfg.arm, rounds)
