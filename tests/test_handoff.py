"""The csg-warm arm's generator handoff (fedcsg.wire.handoff) in-process: each node is handed the frozen
generator once, holds it in its Context.state, is handed it again after it lost it, and never trains
with another generator than the server's; the settings and layouts that make the arm. Through Ray
and the ClientApp: tests/test_simulation.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from fedcsg.fl.server_app import build_strategy, phases
from fedcsg.fl.strategy import CSGFedAvg
from fedcsg.fl.task import build_arm_model, payload_layout, round_layout
from fedcsg.fl.traffic import payload_bytes
from fedcsg.nn.csg_factors import factor_keys, round_factor
from fedcsg.runs.layout import differing_settings
from fedcsg.spec.arms import all_arms, two_way_arms
from fedcsg.spec.config import RunConfig, identity_of
from fedcsg.wire.handoff import Handoff, HandoffOutOfSync, handoff_hash, received_handoff
from fedcsg.wire.messages import CONFIG, HANDOFF, HANDOFF_HASH, TrainInstruction, TrainReply
from fedcsg.wire.payload import PayloadLayout, load_entries, load_payload, model_payload

from .test_downlink import _run
from .test_reliability import ScriptedGrid

WARM = {"model": "fmnist-cnn", "dataset": "fashion-mnist", "arm": "csg-warm", "freeze_generator_after": 2}


def _warm(**changes: object) -> RunConfig:
    return RunConfig(**{**WARM, "num_clients": 4, "num_rounds": 6, "min_train_nodes": 1, **changes})


# -- settings ---------------------------------------------------------------------------------------


def test_freeze_generator_after_is_checked_in_one_line_naming_the_value() -> None:
    for k in (0, 6, 7):
        with pytest.raises(ValueError) as error:
            _warm(freeze_generator_after=k)
        assert str(error.value) == (
            f"freeze-generator-after = {k} is not accepted for arm csg-warm with num-rounds = 6: an integer K in 1..5 "
            "is (the rounds its generator trains)"
        )
    with pytest.raises(
        ValueError, match="downlink 'delta-int8' is not accepted for arm csg-warm: .* accepted are full"
    ):
        _warm(arm="csg-warm+int8/delta-int8")
    with pytest.raises(ValueError, match="server-optimizer = 'fedadam' is not accepted for arm csg-warm"):
        _warm(server_optimizer="fedadam")
    # An arm list that holds csg-warm is checked too; without csg-warm, K is never read.
    with pytest.raises(ValueError, match="freeze-generator-after = 0 is not accepted"):
        RunConfig(**{**WARM, "arm": "csg", "freeze_generator_after": 0}, arms="csg,csg-warm")
    assert RunConfig(arm="csg", freeze_generator_after=0).frozen_after == 0
    assert RunConfig(arm="csg", freeze_generator_after=3).frozen_after == 0
    assert _warm().frozen_after == 2 and _warm(arm="csg-warm+int8/int8").frozen_after == 2


def test_only_csg_warm_has_k_in_its_identity_so_a_run_resumes_with_a_warm_arm_added() -> None:
    csg, csg_k = RunConfig(arm="csg"), RunConfig(arm="csg", freeze_generator_after=5)
    assert csg.identity() == csg_k.identity() and "freeze-generator-after" not in csg.identity()
    assert _warm().identity()["freeze-generator-after"] == 2
    assert _warm().identity() != _warm(freeze_generator_after=3).identity()
    # A record written before the setting existed reads it as 0 (ADDED_SETTINGS), and for csg it is left out.
    older = {k: v for k, v in csg.to_flower().items() if k != "freeze-generator-after"}
    assert identity_of(older) == csg.identity()
    assert identity_of({**older, "arm": "csg-warm+int8/int8"})["freeze-generator-after"] == 0
    # The arms of one run agree in every setting that both read.
    assert differing_settings(csg.identity(), RunConfig(arm="csg-warm", freeze_generator_after=2).to_flower()) == []
    assert differing_settings(_warm().identity(), _warm(freeze_generator_after=3).to_flower()) == [
        "freeze-generator-after"
    ]


def test_the_warm_arm_is_not_in_the_per_round_byte_tables() -> None:
    assert not [arm for arm in all_arms() + two_way_arms() if arm.startswith("csg-warm")]


def test_the_generator_trains_up_to_round_k_then_only_the_codes() -> None:
    assert [round_factor("factors", r, True, frozen_after=2) for r in (1, 2, 3, 6)] == ["all", "all", "codes", "codes"]
    assert [round_factor("factors", r, False, frozen_after=2) for r in (1, 3)] == ["all", "all"]  # nothing to freeze
    assert [round_factor("alternate", r, True, frozen_after=3) for r in (1, 2, 3, 4)] == [
        "codes",
        "generator",
        "codes",
        "codes",
    ]
    assert phases(_warm()) == [(1, 2), (3, 6)]
    assert phases(RunConfig(arm="csg", num_rounds=6, freeze_generator_after=2)) == [(1, 6)]


# -- layouts ----------------------------------------------------------------------------------------


def test_after_round_k_the_payload_holds_everything_but_the_generator() -> None:
    cfg = _warm()
    model = build_arm_model(cfg)
    whole = payload_layout(cfg, model)
    (generator,) = factor_keys(model)["generator"]
    assert round_layout(cfg, model, 2) == whole and not whole.held
    late = round_layout(cfg, model, 3)
    assert late.held == (generator,) and late.keys == [k for k in whole.keys if k != generator]
    assert whole.nbytes - late.nbytes == whole.subset((generator,)).nbytes == model.state_dict()[generator].numel() * 4
    # A payload without the generator loads and keeps the model's own; the generator alone loads alone.
    other = build_arm_model(cfg.replace(seed=1))
    before = other.state_dict()[generator].clone()
    load_payload(other, model_payload(model, late), late)
    assert torch_equal(other.state_dict()[generator], before)
    assert all(torch_equal(other.state_dict()[k], model.state_dict()[k]) for k in late.keys)
    held = whole.subset(late.held)
    load_entries(other, held.pack({generator: model.state_dict()[generator]}), held)
    assert torch_equal(other.state_dict()[generator], model.state_dict()[generator])
    with pytest.raises(ValueError, match="held entries \\['nope'\\] are not in the model's state"):
        PayloadLayout.for_model(model, held=("nope",))


def torch_equal(a, b) -> bool:  # noqa: ANN001 - two tensors
    return bool((a == b).all())


# -- the handoff through the strategy's round loop ----------------------------------------------------


class WarmNodes:
    """Nodes that keep a Context.state each, take the handed-off generator as the ClientApp does
    (:func:`received_handoff`) and reply with the payload they received, slightly moved."""

    def __init__(self, strategy: CSGFedAvg, run: str = "csg-warm:0") -> None:
        self.layout, self.run = strategy.layout, run
        self.states: dict[int, RecordDict] = {}
        self.handed: list[tuple[int, int]] = []  # (round, node) given the arrays
        self.held: dict[tuple[int, int], ArrayRecord] = {}
        self.raised: list[tuple[int, int, str]] = []

    def __call__(self, position: int, node: int, message: Message) -> RecordDict | Error | None:
        instruction = TrainInstruction.of_record(message.content[CONFIG])
        server_round = instruction.server_round
        state = self.states.setdefault(node, RecordDict())
        if HANDOFF in message.content:
            self.handed.append((server_round, node))
        try:
            held = received_handoff(message.content, instruction.handoff_hash, state, self.run)
        except HandoffOutOfSync as error:
            self.raised.append((server_round, node, str(error)))
            return Error(code=1, reason=str(error))
        assert held is not None
        self.held[(server_round, node)] = held
        got = message.content["arrays"]
        rng = np.random.default_rng((server_round, node))
        moved = ArrayRecord(
            {
                k: Array((a.numpy() + rng.normal(0, 1e-2, a.shape)).astype(a.numpy().dtype))
                if k in self.layout.floating_keys()
                else a
                for k, a in got.items()
            }
        )
        metrics = TrainReply(10, 1.0, 0.5, 1.0, partition_id=position, handoff_hash=instruction.handoff_hash)
        return RecordDict({"arrays": moved, "metrics": metrics.record()})


def _frozen_phase(**changes: object) -> tuple[CSGFedAvg, Handoff, ArrayRecord, ArrayRecord]:
    cfg = _warm(**changes)
    model = build_arm_model(cfg)
    whole, late = payload_layout(cfg, model), round_layout(cfg, model, 3)
    held = whole.subset(late.held)
    handoff = Handoff(held, held.pack(whole.unpack(model_payload(model, whole))))
    return build_strategy(cfg, late, model, handoff), handoff, model_payload(model, late), handoff.record


def test_each_node_is_handed_the_generator_once_and_its_bytes_are_counted_then() -> None:
    strategy, handoff, initial, generator = _frozen_phase(fraction_train=0.5)
    nodes = WarmNodes(strategy)
    grid = ScriptedGrid([11, 12, 13, 14], nodes)
    _run(strategy, grid, initial, 6, first=3)
    # Every node that trained held the server's generator; each was handed it in its first round only.
    assert len(nodes.held) == 4 * 2 and not nodes.raised
    assert all(handoff_hash(h) == handoff.digest for h in nodes.held.values())
    trained = {n for _, n in nodes.held}
    assert len(trained) >= 3  # seeded sampling: at least three of the four nodes came in
    first_round = {n: min(r for r, m in nodes.held if m == n) for n in trained}
    assert sorted(nodes.handed) == sorted((r, n) for n, r in first_round.items())
    # The downlink counts the payload each message, and the generator in each message that carries it.
    payload, extra = payload_bytes(initial), payload_bytes(generator)
    for server_round in range(3, 7):
        handed = sum(1 for r, _ in nodes.handed if r == server_round)
        assert strategy.traffic[server_round].payload_down == 2 * payload + handed * extra
        assert strategy.traffic[server_round].payload_up == 2 * payload
    assert all(m.content["config"][HANDOFF_HASH] == handoff.digest for m in grid.sent)
    assert handoff.holders == trained


def test_a_node_that_lost_the_generator_fails_loudly_and_is_handed_it_next_round() -> None:
    strategy, handoff, initial, _ = _frozen_phase(fraction_train=1.0)
    nodes = WarmNodes(strategy)
    grid = ScriptedGrid([11, 12, 13, 14], nodes)
    arrays = _run(strategy, grid, initial, 3, first=3)
    nodes.states[12] = RecordDict()  # restarted: a fresh Context, while the server counts it a holder
    wrong = nodes.states[13]
    (key,) = list(wrong)
    damaged = {k: Array(a.numpy() + np.float32(1.0)) for k, a in wrong[key].items()}
    wrong[key] = ArrayRecord(damaged)  # holds another generator than the server's
    arrays = _run(strategy, grid, arrays, 4, first=4)
    assert [(r, n) for r, n, _ in nodes.raised] == [(4, 12), (4, 13)]
    assert "this node holds nothing and was not sent them" in nodes.raised[0][2]
    assert f"this node holds hash {handoff_hash(ArrayRecord(damaged))}" in nodes.raised[1][2]
    assert strategy.traffic[4].failed == 2 and handoff.holders == {11, 14}
    _run(strategy, grid, arrays, 5, first=5)
    assert sorted(n for r, n in nodes.handed if r == 5) == [12, 13] and len(nodes.raised) == 2
    assert handoff.holders == {11, 12, 13, 14}


def test_a_node_refuses_arrays_whose_hash_is_not_the_one_named() -> None:
    strategy, handoff, initial, generator = _frozen_phase()
    content = RecordDict({HANDOFF: generator})
    with pytest.raises(HandoffOutOfSync, match=f"hash {handoff.digest}, the server's {handoff.digest + 1}"):
        received_handoff(content, handoff.digest + 1, RecordDict(), "csg-warm:0")
    state = RecordDict()
    assert received_handoff(RecordDict(), None, state, "csg-warm:0") is None and not list(state)
    received_handoff(content, handoff.digest, state, "csg-warm:0")
    # One node serves every run of a simulation: another run's generator is kept apart.
    with pytest.raises(HandoffOutOfSync, match="holds nothing"):
        received_handoff(RecordDict(), handoff.digest, state, "csg-warm:1")
    assert received_handoff(RecordDict(), handoff.digest, state, "csg-warm:0") is not None
