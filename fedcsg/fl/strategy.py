"""CSGFedAvg: Flower's FedAvg with exact, dtype-preserving averaging over the arm's payload, reply
checks, deterministic client sampling, failed-round handling, a per-round learning rate, byte
accounting in both directions, and a pluggable server update (:mod:`fedcsg.fl.server_opt`) that turns
the exact average into the new global payload."""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg, Result

from fedcsg.fl.filter_step import PayloadFilters
from fedcsg.fl.flower_logs import without_skipped_evaluation_warning
from fedcsg.fl.privacy import Configure, Privacy, floor_variances
from fedcsg.fl.ray_cluster import DEVICE_KEY, VISIBLE_KEY, reported_placement
from fedcsg.fl.replies import aggregate_train_metrics, checked_reply
from fedcsg.fl.server_opt import Mask, ServerOptimizer
from fedcsg.fl.traffic import accounted_wire_bytes, payload_bytes
from fedcsg.runs.records import ArmRecorder, RoundRecord
from fedcsg.spec.config import sample_size
from fedcsg.wire.downlink import Broadcaster, Downlink
from fedcsg.wire.handoff import Handoff
from fedcsg.wire.messages import (
    HANDOFF,
    PARTITION_ID,
    TEST_ACCURACY,
    TEST_LOSS,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    WEIGHT_KEY,
    TrainInstruction,
    VersionMismatch,
    reply_metrics,
)
from fedcsg.wire.payload import PayloadLayout, weighted_average
from fedcsg.wire.uplink import Uplink


def ordered_node_ids(grid: Grid) -> list[int]:
    """Connected nodes in registration order (ties broken by id).

    Flower's simulation engine registers its virtual SuperNodes in partition order, so position
    ``i`` is partition ``i`` whatever random ids the run drew: sampling positions makes the
    sampled partitions a function of the seed and the round alone. A grid that does not report
    registration times gives its nodes sorted by id.
    """
    nodes = list(grid.get_nodes())
    return [n.node_id for n in sorted(nodes, key=lambda n: (n.registered_at, n.node_id))]


def sample_positions(seed: int, server_round: int, attempt: int, num_nodes: int, sample_size: int) -> list[int]:
    """Sorted positions of the nodes sampled in ``server_round`` (attempt ``attempt``): a function
    of these arguments only, never of Python's global ``random`` state, so a resumed run samples
    the same clients as an uninterrupted one."""
    rng = np.random.default_rng((seed, server_round, attempt))
    return sorted(int(i) for i in rng.choice(num_nodes, size=sample_size, replace=False))


class CSGFedAvg(FedAvg):
    """FedAvg over a :class:`~fedcsg.wire.payload.PayloadLayout`, with traffic accounting.

    Parameters
    ----------
    layout
        The arm's payload: every reply must match it key for key, shape for shape, dtype for
        dtype, with finite values and a positive integer num-examples, or it is rejected.
    uplink
        How the clients' replies travel (default: the payload as it is): with a codec, every
        reply is an encoded update, checked as strictly and decoded against the payload the
        client received before it is averaged.
    downlink
        How the global payload travels down (:class:`~fedcsg.wire.downlink.Downlink`; default: as it
        is); a lossy one moves the server's full-precision model by the clients' average update,
        a delta one keeps x̂ and resyncs in full the nodes not known to hold it.
    lr_fn
        Learning rate of a round (``server_round -> lr``), sent in the train instruction.
    seed
        Seeds the client sampling of every round (with the round and the attempt).
    min_replies
        Accepted replies a round needs to update the global model (default 1); with fewer the
        round has failed and the global model is kept.
    failed_round
        What a failed round does next: ``skip`` (go on to the next round) or ``retry`` (send
        the round once more, to a fresh sample; the bytes of both attempts are counted); a run's
        ``failed-round``, checked by its :class:`~fedcsg.spec.config.RunConfig`.
    max_update_norm
        Reject a reply whose payload is farther than this (L2, float entries) from the global
        payload it was sent; 0 turns the check off.
    server_optimizer
        Turns (global payload sent, exact average) into the new global payload; ``None`` (or a
        ``fedavg`` one) keeps the average.
    mask_fn
        ``server_round -> mask`` of the payload elements the server optimizer may move (see
        :meth:`~fedcsg.wire.payload.PayloadLayout.element_mask`); required with a stateful optimizer.
    train_factor_fn
        ``server_round -> the CSG factor that trains`` (:data:`fedcsg.nn.csg_factors.FACTORS`), sent in
        the train instruction; ``None`` names none (all train).
    handoff
        Arrays each node is handed once and keeps, outside the payload (:class:`~fedcsg.wire.handoff.Handoff`:
        a csg-warm arm's frozen generator); every message names them, a node not known to hold them is
        sent them, and their bytes count in the downlink.
    payload_filters
        Turns payloads into conv filters (:class:`~fedcsg.fl.filter_step.PayloadFilters`): with it,
        every aggregated round records its filter step (``filter_step``, ``client_filter_step``),
        measured on the decoded replies the server averages; ``None`` records none.
    privacy_fn
        ``configure -> Privacy`` (:class:`~fedcsg.fl.privacy.Privacy`, run setting ``dp``): Flower's DP wrapper
        takes the strategy's sampling (``configure``) and its checked, decoded replies, and releases the
        round's clipped, noised average; each round records the accountant's epsilon. ``None``: no DP.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimum nodes).
    """

    def __init__(
        self,
        layout: PayloadLayout,
        *,
        lr_fn: Callable[[int], float],
        seed: int = 0,
        min_replies: int = 1,
        failed_round: str = "skip",
        max_update_norm: float = 0.0,
        server_optimizer: ServerOptimizer | None = None,
        mask_fn: Callable[[int], Mask] | None = None,
        train_factor_fn: Callable[[int], str] | None = None,
        uplink: Uplink | None = None,
        downlink: Downlink | None = None,
        handoff: Handoff | None = None,
        payload_filters: PayloadFilters | None = None,
        privacy_fn: Callable[[Configure], Privacy] | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)  # evaluation is server-side, on the test split
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        with without_skipped_evaluation_warning():
            super().__init__(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs)
        self.layout = layout
        self.uplink = uplink or Uplink(layout)
        if self.uplink.layout != layout:
            raise ValueError("the uplink's payload layout is not the strategy's")
        # -- downlink (fedcsg.wire.downlink): what each node is sent, x̂ and who holds it --------------
        self.broadcaster = Broadcaster(downlink or Downlink(layout))
        if self.broadcaster.downlink.layout != layout:
            raise ValueError("the downlink's payload layout is not the strategy's")
        self.server_arrays: ArrayRecord | None = None  # the server's own global payload of this round
        self.handoff = handoff
        self.lr_fn = lr_fn
        self.seed = seed
        self.min_replies = max(1, min_replies)
        self.failed_round = failed_round
        self.max_update_norm = max_update_norm
        self.server_optimizer = server_optimizer or ServerOptimizer("fedavg")
        if self.server_optimizer.stateful and mask_fn is None:
            raise ValueError(f"server optimizer {self.server_optimizer.name!r} needs a mask_fn")
        self.mask_fn = mask_fn
        self.train_factor_fn = train_factor_fn
        self.payload_filters = payload_filters
        self.privacy = privacy_fn(self._configure_train) if privacy_fn is not None else None
        self.stopped_by_privacy: str | None = None  # why the run stopped before its last round (dp-max-epsilon)
        self.traffic: dict[int, RoundRecord] = {}
        self.train_metrics: dict[int, MetricRecord] = {}
        self.global_arrays: ArrayRecord | None = None  # the global payload as this round's clients received it
        self.partition_of: dict[int, int | None] = {}  # node id -> partition id, as the nodes report it
        self._sent: dict[int, list[int]] = {}  # node ids of the current attempt of a round
        self._pushed: dict[int, dict[str, int]] = {}  # its messages' ids (once pushed) -> their nodes

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the strategy: the failed rounds so far and the
        server optimizer's state (momentum, moments). Sampling is a function of (seed, round,
        attempt) and byte counts live in the round records, so nothing else carries over."""
        state: dict[str, Any] = {"failed_rounds": sorted(r for r, t in self.traffic.items() if t.status == "failed")}
        if self.server_optimizer.stateful:
            state["server_optimizer"] = self.server_optimizer.state_dict()
        if self.broadcaster.downlink.is_delta:  # x̂ itself: downlink_arrays()
            state["downlink"] = self.broadcaster.state_dict()
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def downlink_arrays(self) -> ArrayRecord | None:
        """The arrays a checkpoint keeps beside the global payload: a delta downlink's x̂, else None."""
        return self.broadcaster.state_arrays()

    def load_state_dict(self, state: dict[str, Any], downlink_arrays: ArrayRecord | None = None) -> None:
        self.broadcaster.load_state(state.get("downlink", {}), downlink_arrays)
        for server_round in state.get("failed_rounds", []):
            self.traffic.setdefault(int(server_round), RoundRecord(int(server_round), status="failed"))
        if self.server_optimizer.stateful:
            if "server_optimizer" not in state:
                raise ValueError(
                    f"the checkpoint has no state of server optimizer {self.server_optimizer.name!r}: "
                    "it cannot be resumed under this optimizer"
                )
            self.server_optimizer.load_state_dict(state["server_optimizer"])
        if self.privacy is not None:
            if "privacy" not in state:
                raise ValueError("the checkpoint has no privacy accountant: it cannot be resumed under dp")
            self.privacy.load_state_dict(state["privacy"])

    # -- one round ----------------------------------------------------------------------------

    def _round_traffic(self, server_round: int) -> RoundRecord:
        return self.traffic.setdefault(server_round, RoundRecord(server_round, started=time.perf_counter()))

    def _sample(self, server_round: int, attempt: int, grid: Grid) -> tuple[list[int], list[int]]:
        """(sampled node ids, all node ids in registration order): FedAvg's sample size
        (:func:`~fedcsg.spec.config.sample_size`), drawn by :func:`sample_positions` after waiting for
        ``min_available_nodes`` as FedAvg does. Flower's ``strategy_utils.sample_nodes`` holds the same
        wait but draws from Python's global ``random``; the seeded draw here keeps a round's sample a
        function of the seed, round and attempt alone."""
        nodes = ordered_node_ids(grid)
        size = sample_size(len(nodes), self.fraction_train, self.min_train_nodes)
        while len(nodes) < max(self.min_available_nodes, size):
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), size)
            time.sleep(1)
            nodes = ordered_node_ids(grid)
            size = sample_size(len(nodes), self.fraction_train, self.min_train_nodes)
        positions = sample_positions(self.seed, server_round, attempt, len(nodes), size)
        return [nodes[i] for i in positions], nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages: through the DP wrapper when there is one (it sees the payload as
        the clients receive it, and may fill ``config``; PrivacyBudgetExhausted past ``dp-max-epsilon``)."""
        self.server_arrays = arrays
        self.global_arrays = self.broadcaster.prepare(arrays)
        if self.privacy is None:
            return self._configure_train(server_round, config, grid)
        return self.privacy.configure_train(server_round, self.global_arrays, config, grid)

    def _configure_train(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        traffic = self._round_traffic(server_round)
        attempt = traffic.attempts
        traffic.attempts += 1
        if self.fraction_train == 0.0:
            self._sent[server_round] = []
            return []
        node_ids, nodes = self._sample(server_round, attempt, grid)
        for position, node in enumerate(nodes):
            self.partition_of.setdefault(node, position)  # replies correct it if the node says otherwise
        log(INFO, "configure_train: Sampled %s nodes (out of %s), attempt %d", len(node_ids), len(nodes), attempt + 1)
        instruction = TrainInstruction.of_record(config).replace(
            server_round=server_round,
            lr=float(self.lr_fn(server_round)),
            attempt=attempt,
            train_factor=self.train_factor_fn(server_round) if self.train_factor_fn else "",
            handoff_hash=self.handoff.digest if self.handoff else None,
        )
        messages = []
        handoff = self.handoff
        for group in self.broadcaster.groups(node_ids):
            for nodes, handed in self._handoff_groups(group.nodes):
                # entries a DP wrapper put in the config (Flower's clipping norm) travel with the instruction
                config_of_group = ConfigRecord({**config, **instruction.replace(downlink=group.sync).record()})
                contents = {self.arrayrecord_key: group.record, self.configrecord_key: config_of_group}
                payload = payload_bytes(group.record)
                if handoff is not None and handed:
                    contents[HANDOFF] = handoff.record
                    payload += payload_bytes(handoff.record)
                content = RecordDict(contents)
                sent = [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
                wire = sum(accounted_wire_bytes(m) for m in sent)
                traffic.payload_down += payload * len(sent)
                traffic.wire_down += wire
                if group.resync:
                    traffic.resynced += len(sent)
                    traffic.wire_down_resync += wire
                messages += sent
        self._sent[server_round] = node_ids
        traffic.sampled += len(messages)
        return messages

    def _handoff_groups(self, nodes: list[int]) -> list[tuple[list[int], bool]]:
        """``nodes`` as (nodes, handed the handoff's arrays?) groups, empty groups left out."""
        if self.handoff is None:
            return [(nodes, False)]
        holders, others = self.handoff.split(nodes)
        return [(group, handed) for group, handed in ((holders, False), (others, True)) if group]

    def _partition(self, node_id: int) -> int | None:
        return self.partition_of.get(node_id)

    def _note_failures(self, server_round: int, replies: list[Message], valid: list[Message]) -> int:
        """Count and log the sampled clients without a usable reply (raised, timed out, vanished)."""
        traffic = self.traffic[server_round]
        sent = self._sent.pop(server_round, None)
        answered = {r.metadata.src_node_id for r in valid}
        to_node = self._pushed.pop(server_round, {})
        # The SuperLink's own error reply for a node gone silent (Node Unavailable) comes from the SuperLink:
        # its node is the one the answered message went to.
        errors = {
            to_node.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r.error.reason
            for r in replies
            if r.has_error()
        }
        missing = [n for n in sent if n not in answered] if sent is not None else list(errors)
        for node in missing:
            partition = self._partition(node)
            if partition is not None:
                traffic.failed_partitions.append(partition)
            reason = _short_reason(errors.get(node, "no reply within round-timeout"))
            where = "unknown" if partition is None else partition
            traffic.first_error = traffic.first_error or f"client node {node} (partition {where}) failed: {reason}"
            versions = VersionMismatch.versions_in(reason)
            if versions is None:
                log(WARNING, "round %d: client node %d (partition %s) failed: %s", server_round, node, where, reason)
                continue
            traffic.version_mismatch.append(node)
            theirs, ours = versions
            log(
                WARNING,
                "round %d: node %d refused the run: it runs fedcsg %s, this server fedcsg %s; install fedcsg %s on it",
                *(server_round, node, theirs, ours, ours),
            )
        return len(missing) if sent is not None else len(replies) - len(valid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self._round_traffic(server_round)
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]  # errors: logged by _note_failures
        log(INFO, "aggregate_train: Received %s results and %s failures", len(valid), len(replies) - len(valid))
        self.broadcaster.settle(self._sent.get(server_round, []), valid)
        if self.handoff is not None:
            self.handoff.settle(self._sent.get(server_round, []), valid)
        traffic.failed += self._note_failures(server_round, replies, valid)
        traffic.replied += len(valid)
        accepted: list[tuple[tuple[float, int], Message, ArrayRecord]] = []
        for reply in valid:
            node = reply.metadata.src_node_id
            # Error replies carry no payload, and their text (a remote traceback) varies from run to
            # run; only replies with content are counted.
            traffic.wire_up += accounted_wire_bytes(reply)
            traffic.payload_up += sum(payload_bytes(r) for r in reply.content.array_records.values())
            if reply_metrics(reply) is not None:  # its partition, or none: a device that trains on its own data
                self.partition_of[node] = _reported_partition(reply)
            partition = self._partition(node)
            decoded, problem = checked_reply(reply, self.uplink, self.global_arrays, self.max_update_norm)
            if decoded is None:
                traffic.rejected += 1
                where = "unknown" if partition is None else partition
                traffic.first_error = (
                    traffic.first_error or f"reply of node {node} (partition {where}) rejected: {problem}"
                )
                log(
                    WARNING,
                    "round %d: rejected reply from node %d (partition %s): %s",
                    server_round,
                    node,
                    where,
                    problem,
                )
                continue
            if partition is None:  # a device with its own data: the log says what it trained on
                examples = reply_metrics(reply)[WEIGHT_KEY]  # type: ignore[index]  # checked_reply checked it
                log(INFO, "round %d: node %d trained on its own data: %s examples", server_round, node, examples)
            # Sorted by partition below, so that float sums run in the same order in every run.
            accepted.append(((math.inf if partition is None else partition, node), reply, decoded))
        arrays = self._average(server_round, accepted) if len(accepted) >= self.min_replies else None
        if arrays is None:
            if self.privacy is not None and len(accepted) < self.min_replies:
                self.privacy.abandon(server_round)
            traffic.status = "failed"
            retried = self.failed_round == "retry" and traffic.attempts < 2  # start() sends it once more
            log(
                WARNING,
                "round %d: %d of %d replies accepted, fewer than the minimum %d: %s",
                server_round,
                len(accepted),
                len(replies),
                self.min_replies,
                "sending the round once more (failed-round = retry)" if retried else "the global model is kept",
            )
            return None, None
        traffic.status = "ok"
        accepted.sort(key=lambda item: item[0])
        known = [(key, reply) for key, reply, _ in accepted if key[0] != math.inf]
        traffic.partitions = [int(key[0]) for key, _ in known]
        traffic.ray_nodes = [reported_placement(reply.content) for _, reply in known]
        traffic.devices = [reported_placement(reply.content, DEVICE_KEY) for _, reply in known]
        traffic.visible_devices = [reported_placement(reply.content, VISIBLE_KEY) for _, reply in known]
        contents = [reply.content for _, reply, _ in accepted]
        server_arrays = self.server_arrays if self.server_arrays is not None else self.global_arrays
        if server_arrays is not None:
            arrays = self.broadcaster.server_update(server_arrays, arrays)
        if self.server_optimizer.stateful and server_arrays is not None and self.mask_fn is not None:
            arrays = self.server_optimizer(server_round, server_arrays, arrays, self.mask_fn(server_round))
        if self.payload_filters is not None and server_arrays is not None and self.global_arrays is not None:
            step = self.payload_filters.measure(server_arrays, arrays, self.global_arrays, [d for _, _, d in accepted])
            traffic.filter_step, traffic.client_filter_step = step.global_step, step.client_step
        metrics = self.train_metrics_aggr_fn(contents, WEIGHT_KEY)
        self.train_metrics[server_round] = metrics
        return arrays, metrics

    def _average(self, server_round: int, accepted: list[tuple[Any, Message, ArrayRecord]]) -> ArrayRecord | None:
        """The round's average of the decoded replies (weighted by num-examples), its floating entries
        released by the DP wrapper when there is one (None when the wrapper refuses the round)."""
        decoded = [record for _, _, record in accepted]
        weights = [int(next(iter(reply.content.metric_records.values()))[WEIGHT_KEY]) for _, reply, _ in accepted]
        arrays = weighted_average(decoded, weights)
        if self.privacy is None:
            return arrays
        released = self.privacy.average(server_round, decoded)
        if released is None and self.privacy.wrapper is not None:
            return None
        self.privacy.released()
        if released is not None:  # else local DP: the clients' updates carry their noise
            arrays = ArrayRecord({key: released[key] if key in released else array for key, array in arrays.items()})
        return floor_variances(arrays, self.layout)

    # -- the run --------------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        evaluate_initial: bool = True,
        round_end_fn: Callable[[int, ArrayRecord], None] | None = None,
        recorder: ArmRecorder | None = None,
    ) -> Result:
        """Flower's :meth:`Strategy.start` loop, able to continue a run and to retry a round.

        ``train_config`` is the record of the run's :class:`~fedcsg.wire.messages.TrainInstruction`,
        whose round, attempt, learning rate, CSG factor, downlink versions and handoff each round fills
        in. Runs rounds ``first_round..num_rounds`` from ``initial_arrays`` (the global payload after
        round ``first_round - 1``). Round 0 (the initial model) is evaluated only when
        ``evaluate_initial``. A client that has not replied within ``timeout`` seconds has failed.
        When a round ends with too few accepted replies, ``retry`` sends it once more. After the
        server-side evaluation of every round (round 0 included), ``round_end_fn(round, arrays)``
        is called: the place to checkpoint. The strategy composes each evaluated round's record
        (:meth:`finished_round`) and hands it to ``recorder``, the one place it is recorded.
        """
        log(INFO, "Starting %s strategy: rounds %d..%d", self.__class__.__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays = initial_arrays
        started = time.time()
        if evaluate_initial:
            self._evaluate(result, evaluate_fn, first_round - 1, arrays, recorder)
            if round_end_fn is not None:
                round_end_fn(first_round - 1, arrays)
        attempts = 2 if self.failed_round == "retry" else 1
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            try:
                agg_arrays, agg_metrics = self._train_round(grid, server_round, arrays, train_config, timeout, attempts)
            except PrivacyBudgetExhausted as stop:
                self.stopped_by_privacy = f"stopped before round {server_round}: {stop}"
                log(WARNING, "dp-max-epsilon: %s", self.stopped_by_privacy)
                break
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[server_round] = agg_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
            )
            agg_evaluate = self.aggregate_evaluate(server_round, evaluate_replies)
            if agg_evaluate is not None:
                result.evaluate_metrics_clientapp[server_round] = agg_evaluate
            self._evaluate(result, evaluate_fn, server_round, arrays, recorder)
            if round_end_fn is not None:
                round_end_fn(server_round, arrays)
        result.arrays = arrays  # the final global payload, also when no remaining round could update it
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    def _train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float, attempts: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Send the round (once more on failure when ``attempts`` is 2) and aggregate its replies."""
        agg_arrays, agg_metrics = None, None
        for _ in range(attempts):
            messages = self.configure_train(server_round, arrays, config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            # The grid gave each message its id when it pushed it: what a reply answers, whoever wrote it.
            pushed = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
            self._pushed[server_round] = pushed
            agg_arrays, agg_metrics = self.aggregate_train(server_round, replies)
            if agg_arrays is not None:
                break
        return agg_arrays, agg_metrics

    def finished_round(self, server_round: int, evaluation: MetricRecord) -> RoundRecord:
        """The record of ``server_round`` once it is evaluated: its traffic (round 0: none,
        ``initial``), the clients' mean train metrics, the learning rate, the server-side
        ``evaluation`` (:data:`~fedcsg.wire.messages.TEST_ACCURACY`, ``TEST_LOSS``) and its seconds."""
        traffic = self.traffic.get(server_round) or RoundRecord(server_round, status="initial")
        train = self.train_metrics.get(server_round, {})
        return dataclasses.replace(
            traffic,
            test_accuracy=evaluation[TEST_ACCURACY],
            test_loss=evaluation[TEST_LOSS],
            train_loss=train.get(TRAIN_LOSS),
            train_accuracy=train.get(TRAIN_ACCURACY),
            lr=self.lr_fn(server_round) if server_round else None,
            seconds=time.perf_counter() - traffic.started if server_round else 0.0,
            epsilon=self.privacy.epsilon if self.privacy is not None else None,
        )

    def _evaluate(
        self,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        server_round: int,
        arrays: ArrayRecord,
        recorder: ArmRecorder | None,
    ) -> None:
        if evaluate_fn is None:
            return
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics
            if recorder is not None:
                recorder.add(self.finished_round(server_round, metrics), save=False)


def _short_reason(reason: object) -> str:
    """The message of a client's error without the remote traceback around it, on one line."""
    text = " ".join(str(reason).split())
    if "Message: " in text:  # Flower wraps a ClientApp's exception as "... Message: <the exception>'>"
        text = text.rsplit("Message: ", 1)[1].removesuffix("'>")
    return text if len(text) <= 300 else "..." + text[-297:]


def _reported_partition(reply: Message) -> int | None:
    """The partition id a reply's metrics report, if any."""
    metrics = reply_metrics(reply)
    if metrics is None:
        return None
    value = metrics.get(PARTITION_ID)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lr_schedule(base_lr: float, schedule: str, num_rounds: int) -> Callable[[int], float]:
    """``server_round -> lr`` (rounds count from 1): constant, the paper's step schedule
    (x0.1 at 50% and x0.01 at 75% of the rounds) or cosine to zero."""
    from fedcsg.nn.training import step_lr

    return lambda server_round: step_lr(base_lr, server_round - 1, num_rounds, schedule)
