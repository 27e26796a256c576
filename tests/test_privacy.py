"""Differential privacy through Flower's wrappers, mods and accountant (issue 40, docs/privacy.md).

Everything here runs in this process: the strategy over a scripted grid whose replies the tests build
(encoded by the arm's own uplink where it has a codec), Flower's client mods over a scripted app, and
the CLI's refusals through ``fedcsg.cli.main``. Nothing starts Ray."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedcsg.fl.flower_private import offline_task_identity
from fedcsg.fl.privacy import client_mod, floating_split, on_floating_entries
from fedcsg.fl.server_app import build_strategy
from fedcsg.fl.strategy import CSGFedAvg
from fedcsg.fl.task import build_arm_model, payload_layout
from fedcsg.runs.records import RoundRecord
from fedcsg.spec.config import RunConfig
from fedcsg.wire.payload import model_payload

from .test_hostile_input import Cli, refused
from .test_reliability import RUN_INSTRUCTION, ScriptedGrid, _reply

NODES = [11, 7, 42, 3]
SMALL = {"model": "fmnist-cnn", "dataset": "fashion-mnist", "slice": "8x8x3x3", "code_dim": 32, "num_clients": 4}


def _norm(record: ArrayRecord, reference: ArrayRecord) -> float:
    return math.sqrt(
        sum(float(np.sum((record[k].numpy().astype(np.float64) - reference[k].numpy()) ** 2)) for k in record)
    )


def _setup(arm: str, **dp: object) -> tuple[RunConfig, CSGFedAvg, ArrayRecord]:
    cfg = RunConfig(**SMALL, arm=arm, arms=arm, num_rounds=3, **dp)
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    return cfg, build_strategy(cfg, layout, model), model_payload(model, layout)


def _updated(strategy: CSGFedAvg, message: Message, position: int, scale: float) -> RecordDict:
    """Client ``position``'s reply: the payload it received moved by ``scale`` x a fixed random direction
    (integer buffers moved by position + 1), encoded by the arm's uplink."""
    received = message.content["arrays"]
    rng = np.random.default_rng(position)
    local = ArrayRecord(
        {
            key: Array(
                a.numpy() + (scale * rng.standard_normal(a.numpy().shape)).astype(a.numpy().dtype)
                if np.issubdtype(a.numpy().dtype, np.floating)
                else a.numpy() + position + 1
            )
            for key, a in received.items()
        }
    )
    encoded, _ = strategy.uplink.encode(local, received, None, np.random.default_rng(0))
    return _reply(encoded, 10 + position, position)


class _Records:
    def __init__(self) -> None:
        self.rounds: list[RoundRecord] = []

    def add(self, record: RoundRecord, save: bool = False) -> None:
        self.rounds.append(record)


def _run(strategy: CSGFedAvg, initial: ArrayRecord, rounds: int, scale: float) -> _Records:
    offline_task_identity()
    records = _Records()
    grid = ScriptedGrid(NODES, lambda pos, node, msg: _updated(strategy, msg, pos, scale))
    evaluation = MetricRecord({"test-accuracy": 0.5, "test-loss": 1.0})
    strategy.start(grid, initial, rounds, 1.0, RUN_INSTRUCTION, evaluate_fn=lambda *_: evaluation, recorder=records)
    return records


@pytest.mark.parametrize("arm", ["csg", "csg+int8", "fedavg/delta-int8"])
def test_central_clipping_bounds_every_update_in_the_arms_space(arm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = 0.5
    cfg, strategy, initial = _setup(arm, dp="central-fixed", dp_clipping_norm=clip, dp_noise_multiplier=1e-3)
    seen: list[list[ArrayRecord]] = []
    inner = strategy.privacy.wrapper.strategy
    original = inner.aggregate_train

    def spy(server_round, replies):  # noqa: ANN001, ANN202 - Flower's signature
        replies = list(replies)
        seen.append([r.content["arrays"].copy() for r in replies])
        return original(server_round, replies)

    monkeypatch.setattr(inner, "aggregate_train", spy)
    _run(strategy, initial, rounds=1, scale=0.05)  # every raw update's norm is ~0.05 * sqrt(d) >> clip
    floats, _ = floating_split(strategy.global_arrays)
    assert len(seen) == 1 and len(seen[0]) == len(NODES)
    for record in seen[0]:
        assert list(record.keys()) == list(floats.keys())  # decoded, floating entries of the arm's payload
        assert _norm(record, floats) == pytest.approx(clip, rel=1e-4)  # clipped to the bound, not below it


def test_noise_on_a_zero_update_has_std_sigma_c_over_n() -> None:
    sigma, clip = 1.0, 0.5
    cfg, strategy, initial = _setup("fedavg", dp="central-fixed", dp_clipping_norm=clip, dp_noise_multiplier=sigma)
    offline_task_identity()
    floats, ints = floating_split(initial)
    first = next(iter(floats))

    def nudged(pos: int, node: int, msg: Message) -> RecordDict:
        # A zero update but for one coordinate: Flower 1.41's clipping divides by the update's norm.
        arrays = msg.content["arrays"].copy()
        values = arrays[first].numpy().copy()
        values.flat[0] += 1e-3
        arrays[first] = Array(values)
        return _reply(arrays, 10 + pos, pos)

    grid = ScriptedGrid(NODES, nudged)
    replies = grid.send_and_receive(strategy.configure_train(1, initial, RUN_INSTRUCTION, grid))
    arrays, _ = strategy.aggregate_train(1, replies)
    noise = np.concatenate([arrays[k].numpy().astype(np.float64).ravel() - floats[k].numpy().ravel() for k in floats])
    noise = noise[1:]
    expected = sigma * clip / len(NODES)
    assert noise.size > 60_000  # sampling error of the std: about 1 / sqrt(2 * size) < 0.3%
    assert noise.std() == pytest.approx(expected, rel=0.01) and abs(noise.mean()) < 5 * expected / noise.size**0.5
    for key in ints:  # integer buffers take the exact average, unnoised
        assert np.array_equal(arrays[key].numpy(), ints[key].numpy())


def test_a_noised_release_floors_batchnorm_variances_at_zero_and_nothing_else() -> None:
    """Noise of std 12.5 on running variances of 1: about half would go below zero, which BatchNorm turns into
    NaN; the release floors exactly those at 0 (post-processing) and leaves every other coordinate noised."""
    cfg, strategy, initial = _setup("fedavg", dp="central-fixed", dp_clipping_norm=0.5, dp_noise_multiplier=100.0)
    offline_task_identity()
    grid = ScriptedGrid(NODES, lambda pos, node, msg: _updated(strategy, msg, pos, 1e-3))
    arrays, _ = strategy.aggregate_train(
        1, grid.send_and_receive(strategy.configure_train(1, initial, RUN_INSTRUCTION, grid))
    )
    model = build_arm_model(cfg)
    layout = payload_layout(cfg, model)
    variances = {e.key for e in layout.floating if e.key.endswith("running_var")}
    masks = layout.element_mask(variances)
    assert sum(int(m.sum()) for m in masks.values()) > 100  # the model has BatchNorm variances to floor
    for key, mask in masks.items():
        values = arrays[key].numpy().ravel()
        assert values[mask].min() == 0.0 and (values[mask] == 0).mean() > 0.3  # floored, not dropped
        assert values[~mask].min() < -10  # the other coordinates keep their noise, signs and all


def _accountant_epsilons(cfg: RunConfig, releases: int) -> list[float]:
    accountant = RdpAccountant(
        PrivacyConfig(
            cfg.dp_target_delta, cfg.num_clients, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
        )
    )
    out = [0.0]
    for _ in range(releases):
        accountant.compose(GaussianPrivacyEvent(cfg.dp_noise_multiplier, cfg.sampled_clients, cfg.num_clients))
        out.append(accountant.get_privacy_spent().epsilon)
    return out


@pytest.mark.parametrize("mode", ["central-fixed", "central-adaptive", "local"])
def test_recorded_epsilon_is_the_accountants_and_max_epsilon_stops_the_run(mode: str) -> None:
    dp = {"dp": mode, "dp_noise_multiplier": 0.3 if mode == "central-adaptive" else 1.5, "dp_clipping_norm": 1.0}
    cfg, strategy, initial = _setup("csg", **dp)
    expected = _accountant_epsilons(cfg, 3)
    records = _run(strategy, initial, rounds=3, scale=0.01)
    assert [r.epsilon for r in records.rounds] == pytest.approx(expected, rel=1e-12)
    assert strategy.stopped_by_privacy is None and all(e > 0 for e in expected[1:])

    # A limit between the second and the third round's epsilon: the run stops after round 2, saying so.
    cfg, strategy, initial = _setup("csg", **dp, dp_max_epsilon=(expected[2] + expected[3]) / 2)
    records = _run(strategy, initial, rounds=3, scale=0.01)
    assert [r.round for r in records.rounds] == [0, 1, 2]
    assert records.rounds[-1].epsilon == pytest.approx(expected[2], rel=1e-12)
    assert strategy.stopped_by_privacy.startswith("stopped before round 3: The next private release would exceed")


def test_client_fixed_sends_the_clipping_norm_and_the_mod_clips_floating_entries_only() -> None:
    clip = 0.25
    cfg, strategy, initial = _setup("csg", dp="client-fixed", dp_clipping_norm=clip)
    offline_task_identity()
    grid = ScriptedGrid(NODES, lambda pos, node, msg: _reply(msg.content["arrays"], 10 + pos, pos))
    (message, *_) = strategy.configure_train(1, initial, RUN_INSTRUCTION, grid)
    assert message.content["config"][KEY_CLIPPING_NORM] == clip  # Flower's wrapper filled it; it travelled

    def app(msg: Message, context: Context) -> Message:
        assert list(msg.content["arrays"].keys()) == list(initial.keys())  # the client trains on the whole payload
        return Message(_updated(strategy, msg, 0, 0.05), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = on_floating_entries(client_mod(cfg), message, context, app)
    floats, ints = floating_split(initial)
    sent = reply.content["arrays"]
    assert list(sent.keys()) == list(initial.keys())
    assert _norm(floating_split(sent)[0], floats) == pytest.approx(clip, rel=1e-4)
    for key in ints:
        assert np.array_equal(sent[key].numpy(), ints[key].numpy() + 1)  # the counters pass unclipped


def test_local_dp_noise_is_sigma_times_c_on_each_update() -> None:
    sigma, clip = 2.0, 0.1
    cfg = RunConfig(dp="local", dp_noise_multiplier=sigma, dp_clipping_norm=clip)
    zeros = ArrayRecord({"w": Array(np.zeros(200_000, np.float32)), "n": Array(np.zeros(3, np.int64))})
    offline_task_identity()
    message = Message(
        RecordDict({"arrays": zeros, "config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    nudged = np.zeros(200_000, np.float32)
    nudged[0] = 1e-3  # a zero update but for one coordinate: Flower 1.41's clipping divides by its norm
    update = ArrayRecord({"w": Array(nudged), "n": Array(np.zeros(3, np.int64))})
    reply = on_floating_entries(
        client_mod(cfg), message, context, lambda msg, ctx: Message(RecordDict({"arrays": update}), reply_to=msg)
    )
    assert reply.content["arrays"]["w"].numpy()[1:].std() == pytest.approx(sigma * clip, rel=0.01)
    assert np.array_equal(reply.content["arrays"]["n"].numpy(), np.zeros(3, np.int64))


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["dp=local", "arm=csg+int8"], "arm 'csg+int8' is not accepted with dp = 'local': Flower's mod would clip"),
        (["dp=client-fixed", "arm=fedavg/int8"], "the message holds the int8 downlink's encoding"),
        (
            ["dp=client-fixed", "arm=csg-warm", "freeze-generator-after=1", "num-rounds=2"],
            "arm 'csg-warm' is not accepted with dp = 'client-fixed': its messages hand off the frozen generator",
        ),
        (["dp=central-adaptive", "dp-noise-multiplier=1.0"], "Flower's adaptive clipping needs sigma < clients"),
        (["dp=central-fixed", "dp-target-delta=1.5"], "dp-target-delta = 1.5 is not accepted: a number in (0, 1) is"),
        (["dp=secure"], "dp = 'secure' is not accepted: one of none, central-fixed"),
        # checked with dp off too: a setting a run takes is a valid one, used or not
        (["dp-clip-norm-lr=inf"], "dp-clip-norm-lr = inf is not accepted: a finite number > 0 is"),
    ],
)
def test_refused_combinations_in_one_line(pairs: list[str], message: str, tmp_path: Path, cli: Cli) -> None:
    args = [arg for pair in pairs for arg in ("--set", pair)]
    refused(cli, ["run", *args, "--out", str(tmp_path / "out")], message, tmp_path)


def test_report_has_the_epsilon_column_sentence_and_plot(tmp_path: Path) -> None:
    from fedcsg.runs.records import ArmRecorder
    from fedcsg.runs.report import write_report

    from .records import round_record

    cfg = RunConfig(num_rounds=2, dp="central-fixed", dp_clipping_norm=0.5, dp_noise_multiplier=1.5)
    stops = {"fedavg": None, "csg": "stopped before round 3: The next private release would exceed max_epsilon"}
    for arm, stopped in stops.items():
        recorder = ArmRecorder(tmp_path, arm, {**cfg.to_flower(), "arm": arm})
        if stopped:
            recorder.extra["stopped_by_privacy"] = stopped
        for rnd, (accuracy, epsilon) in enumerate([(0.1, 0.0), (0.3, 2.98), (0.4, 4.5)]):
            recorder.add(round_record(rnd, accuracy, epsilon=epsilon), save=False)
        recorder.save()
    results = write_report(tmp_path)
    assert [r["epsilon"] for r in results["arms"]["csg"]["rounds"]] == [0.0, 2.98, 4.5]
    # the summary holds the epsilon after the last round
    assert results["summary"]["csg"]["epsilon"] == {"mean": 4.5, "std": 0.0, "n": 1, "values": [4.5]}
    report = (tmp_path / "report.md").read_text()
    assert "updates clipped to L2 norm 0.5, noise multiplier 1.5. *epsilon* is Flower's RDP accountant's" in report
    assert "| fedavg | 4.5 | 0.4000 | 2 | no |" in report
    assert f"| csg | 4.5 | 0.4000 | 2 | {stops['csg']} |" in report
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 1000
    assert "epsilon" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_a_resumed_strategy_continues_the_accountant_and_the_adaptive_norm() -> None:
    dp = {"dp": "central-adaptive", "dp_noise_multiplier": 0.3, "dp_clipping_norm": 1.0}
    cfg, strategy, initial = _setup("csg", **dp)
    _run(strategy, initial, rounds=2, scale=0.01)
    state = strategy.state_dict()
    _, resumed, _ = _setup("csg", **dp)
    resumed.load_state_dict(state)
    assert resumed.privacy.epsilon == pytest.approx(_accountant_epsilons(cfg, 2)[2], rel=1e-12)
    assert resumed.privacy.clipping_norm == strategy.privacy.clipping_norm != 1.0  # adapted, and carried over
    with pytest.raises(ValueError, match="no privacy accountant"):
        resumed.load_state_dict({})


def test_the_client_apps_mod_clips_what_its_training_sent(data_env: Path) -> None:
    """fedcsg's ClientApp with its dp mod, in this process: a real local round under client-fixed."""
    from fedcsg.fl import client_app

    clip = 0.01
    cfg, strategy, initial = _setup("csg", dp="client-fixed", dp_clipping_norm=clip, train_limit=64, compile="off")
    offline_task_identity()
    grid = ScriptedGrid(NODES, lambda pos, node, msg: None)
    (message, *_) = strategy.configure_train(1, initial, RUN_INSTRUCTION, grid)
    node_config = {"partition-id": 0, "num-partitions": cfg.num_clients}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=cfg.to_flower())
    reply = client_app.dp_mod(message, context, client_app.train)
    assert not reply.has_error(), reply.error
    sent = reply.content["arrays"]
    floats, ints = floating_split(initial)
    assert list(sent.keys()) == list(initial.keys())
    assert _norm(floating_split(sent)[0], floats) == pytest.approx(clip, rel=1e-4)
    assert all((sent[k].numpy() > ints[k].numpy()).all() for k in ints)  # the batch counters moved, unclipped


@pytest.mark.parametrize("mode", ["central-fixed", "central-adaptive"])
def test_a_round_missing_a_sampled_update_releases_nothing_and_costs_no_epsilon(mode: str) -> None:
    dp = {"dp": mode, "dp_noise_multiplier": 0.3 if mode == "central-adaptive" else 1.5}
    cfg, strategy, initial = _setup("csg", **dp)
    offline_task_identity()

    def respond(pos: int, node: int, msg: Message) -> RecordDict | None:
        first_round = msg.content["config"]["server-round"] == 1
        return None if first_round and pos == 1 else _updated(strategy, msg, pos, 0.01)

    records = _Records()
    evaluation = MetricRecord({"test-accuracy": 0.5, "test-loss": 1.0})
    grid = ScriptedGrid(NODES, respond)
    strategy.start(grid, initial, 2, 1.0, RUN_INSTRUCTION, evaluate_fn=lambda *_: evaluation, recorder=records)
    assert [(r.status, r.epsilon) for r in records.rounds] == [
        ("initial", 0.0),
        ("failed", 0.0),
        ("ok", pytest.approx(_accountant_epsilons(cfg, 1)[1], rel=1e-12)),
    ]


def test_a_dp_mode_without_the_accountants_backend_is_refused_in_one_line(
    tmp_path: Path, cli: Cli, data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `privacy` extra absent (dp-accounting not importable): refused before anything is written."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else find_spec(name, *a)
    )
    refused(
        cli,
        ["run", "--set", "dp=central-fixed", "--out", str(tmp_path / "out")],
        "dp = 'central-fixed' is not accepted here: dp-accounting (Flower's accountant) is not installed",
        tmp_path,
    )


# ------------------------------------------------------------------- the experiment's two studies


def test_noise_gain_is_the_generators_row_norm_for_a_frozen_generator_and_one_for_fedavg(tmp_path: Path) -> None:
    # Noise of std s on every code reaches each generated filter weight with std s * |row of G|; the
    # frozen generator's entries are +-0.5, so its gain is 0.5 * sqrt(code-dim) = 2.83 at code-dim 32.
    # A fedavg coordinate is a filter weight: gain 1. (Sampling error of 20 draws of >= 9,216 weights.)
    import json

    from simulations.studies.dp_noise_gain import main

    out = tmp_path / "gain.json"
    assert main(["--arms", "fedavg,csg-frozen", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    for layer in layers:
        stem = layer["layer"] == "features.0"  # ordinary in every arm
        expected = 1.0 if layer["arm"] == "fedavg" or stem else 0.5 * math.sqrt(32)
        assert layer["gain"] == pytest.approx(expected, rel=0.02), layer
    assert {layer["arm"] for layer in layers} == {"fedavg", "csg-frozen"} and len(layers) == 8


def test_privacy_sweep_tabulates_and_plots_runs_at_several_noise_multipliers(tmp_path: Path, capsys) -> None:
    import json

    from simulations.studies.privacy_sweep import main

    def spread(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return {"mean": mean, "std": std, "n": len(values), "values": values}

    runs = []
    for name, dp, sigma, final in (("a", "central-fixed", 1.0, [0.2, 0.4]), ("b", "none", 1.0, [0.8])):
        run = tmp_path / name
        run.mkdir()
        summary = {
            "fedavg": {
                "final_accuracy": spread(final),
                "last_accuracy": spread(final),
                "total_wire_bytes": spread([1000.0]),
                **({"epsilon": spread([30.0, 30.0])} if dp != "none" else {}),
            }
        }
        config = {"dp": dp, "dp-noise-multiplier": sigma}
        (run / "results.json").write_text(json.dumps({"config": config, "summary": summary}))
        runs.append(str(run))
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert main([*runs, "--plot", str(plot), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "0.3000 ± 0.1414" in table and "0.2000, 0.4000" in table and "inf" in table
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sigma"], r["epsilon"]) for r in rows] == [(1.0, 30.0), (None, None)]
    assert plot.stat().st_size > 10_000
